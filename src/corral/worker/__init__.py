"""Child side of corral: the warden (forkserver and reaper) and the worker loop.

Never imports ``corral.supervisor``. Entry point: ``python -m corral.worker``.
"""
