"""The process model: the main process that binds the listeners, supervises the engines and starts
the workers (`main`), and one worker process serving the app with its graceful drain (`worker`).

May import: `gateway.front` and everything below it.
"""
