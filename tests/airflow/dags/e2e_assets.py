"""A producer writes an asset's state and a consumer, with the asset as an inlet, reads it."""

from airflow.sdk import Asset, dag, task

ORDERS = Asset(name="e2e_orders", uri="file:///e2e/orders")


@dag(dag_id="e2e_assets", schedule=None, catchup=False)
def e2e_assets():
    @task(outlets=[ORDERS])
    def produce(**context):
        store = context["asset_state_store"][ORDERS]
        store.set("watermark/2026-12", {"rows": 42, "run": context["run_id"]})

    @task(inlets=[ORDERS])
    def consume(**context):
        seen = context["asset_state_store"][ORDERS].get("watermark/2026-12")
        assert seen == {"rows": 42, "run": context["run_id"]}, f"the consumer read {seen!r}"

    produce() >> consume()


e2e_assets()
