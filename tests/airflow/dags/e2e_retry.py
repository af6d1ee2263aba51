"""A task whose first try writes state and fails; the retry must read what the first try wrote."""

from datetime import timedelta

from airflow.sdk import dag, task


@dag(dag_id="e2e_retry", schedule=None, catchup=False)
def e2e_retry():
    @task(retries=1, retry_delay=timedelta(seconds=1))
    def flaky(task_state_store=None, ti=None):
        if ti.try_number == 1:
            task_state_store.set("first/try", {"try": 1, "job": "j-1/a"})
            raise RuntimeError("the first try fails on purpose")
        seen = task_state_store.get("first/try")
        assert seen == {"try": 1, "job": "j-1/a"}, f"the retry read {seen!r}"
        task_state_store.set("second/try", {"try": ti.try_number, "resumed": seen["job"]})

    flaky()


e2e_retry()
