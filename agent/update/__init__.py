"""The device's update pipeline: from a signed desired set to the active models.

:mod:`.pipeline` (the ``Updater``) does the I/O around it: :mod:`.intake`
decides, purely, what a ``desired`` document means, as a whole and per
model name (ignore, reject, refresh, accept; per name new, refresh,
rejected, remove); :mod:`.setfit` checks the whole set fits before any of
it downloads; :mod:`.steps` runs one entry's update (stage, health check,
activate; units activate together), with :mod:`.download` retrying
:mod:`.fetcher`'s downloads (bytes written by :mod:`.sink`);
:mod:`.staging` checks artifacts before they enter their name's
:mod:`.store` (versioned directories with an atomic ``active`` pointer),
one per model name under :mod:`.stores`; :mod:`.ledger` records each
transition in :mod:`.state`'s persisted file and reports it;
:mod:`.outcome` holds how a step stops; :mod:`.policy_gate` holds an
entry's download and activation for its signed update policy (windows on
:mod:`.clock`, :mod:`.locks`, :mod:`.metered` links; the rate cap of
:mod:`.throttle`); :mod:`.startup` and
:mod:`.recovery` make a crash harmless at the next start. Nothing is
re-exported here, so importing one part does not drag in the rest.
"""
