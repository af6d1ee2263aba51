"""Two tasks write state; with `[state_store] clear_on_success` only the one that succeeds loses it."""

from airflow.sdk import dag, task


@dag(dag_id="e2e_clear_on_success", schedule=None, catchup=False)
def e2e_clear_on_success():
    @task
    def succeeds(task_state_store=None):
        task_state_store.set("cleared/on-success", 1)
        assert task_state_store.get("cleared/on-success") == 1

    @task(retries=0)
    def fails(task_state_store=None):
        task_state_store.set("kept/after-failure", 2)
        assert task_state_store.get("kept/after-failure") == 2
        raise RuntimeError("fails on purpose: a failed task keeps its state")

    succeeds()
    fails()


e2e_clear_on_success()
