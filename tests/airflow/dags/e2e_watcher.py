"""An asset watched by an event trigger that writes the asset's state; the DAG it schedules reads it."""

from e2e_triggers import StateWritingTrigger

from airflow.sdk import Asset, AssetWatcher, dag, task

SIGNAL = Asset(
    name="e2e_signal",
    uri="file:///e2e/signal",
    watchers=[AssetWatcher(name="e2e_signal_watcher", trigger=StateWritingTrigger())],
)


@dag(dag_id="e2e_watcher", schedule=[SIGNAL], catchup=False)
def e2e_watcher():
    @task(inlets=[SIGNAL])
    def read(**context):
        seen = context["asset_state_store"][SIGNAL].get("seen/by-watcher")
        assert seen == {"by": "trigger", "n": 1}, f"the task read {seen!r}"

    read()


e2e_watcher()
