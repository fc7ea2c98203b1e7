"""The device's update pipeline: from a signed assignment to an active model.

:mod:`.pipeline` runs it (intake, download, fit check, health check,
activation); :mod:`.fetcher` downloads artifacts; :mod:`.staging` verifies
them before they enter :mod:`.store`, the versioned model directories with
their atomic ``active`` pointer; :mod:`.state` persists the pipeline's state
machine and :mod:`.recovery` resumes it after a crash. Nothing is re-exported
here, so importing one part does not drag in the rest.
"""
