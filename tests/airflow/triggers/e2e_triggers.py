"""An event trigger for the watcher scenario (on PYTHONPATH for every Airflow component).

It writes its asset's state once, through the triggerer's asset_state_store, then fires one
event; afterwards it finds its own mark and stays quiet.
"""

import asyncio

from airflow.triggers.base import BaseEventTrigger, TriggerEvent


class StateWritingTrigger(BaseEventTrigger):
    def serialize(self):
        return ("e2e_triggers.StateWritingTrigger", {})

    async def run(self):
        store = self.asset_state_store
        if await store.aget("seen/by-watcher") is None:
            await store.aset("seen/by-watcher", {"by": "trigger", "n": 1})
            yield TriggerEvent({"written": True})
        while True:
            await asyncio.sleep(3600)
