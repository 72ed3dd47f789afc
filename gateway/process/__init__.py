"""The process model: the main process that binds the listeners, supervises the engines and starts
the workers (`main`), and one worker process serving the app with its graceful drain (`worker`), and a worker's tie to the main process with its
exit that nothing holds up (`lifeline`).

May import: `gateway.front` and everything below it.
"""
