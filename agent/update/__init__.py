"""The device's update pipeline: from a signed assignment to an active model.

:mod:`.pipeline` (the ``Updater``) does the I/O around it: :mod:`.intake`
decides, purely, what a ``desired`` message means (ignore, reject, refresh,
accept); :mod:`.steps` runs an accepted update (verify again, fit check,
stage, health check, activate), with :mod:`.download` retrying
:mod:`.fetcher`'s downloads (bytes written by :mod:`.sink`); :mod:`.staging`
checks artifacts before they enter :mod:`.store`, the versioned model
directories with their atomic ``active`` pointer; :mod:`.ledger` records
each transition in :mod:`.state`'s persisted file and reports it;
:mod:`.outcome` holds how a step stops; :mod:`.recovery` checks the active
model after a crash. Nothing is re-exported here, so importing one part
does not drag in the rest.
"""
