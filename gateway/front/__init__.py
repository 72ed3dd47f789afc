"""The HTTP front: the app factory (`app`), our HTTP/1.1 connection limits (`connection`), the
outermost middleware with the one error mapping (`middleware`), which listener serves what
(`listeners`), readiness (`readiness`), the URL's identifiers checked (`params`), the store's life in a process (`store_service`) and the
routes (`routes/`).

May import: everything below it (`gateway.batch`, `gateway.proxy` and lower).
"""
