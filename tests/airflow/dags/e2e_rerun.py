"""Each run must start with no task state: a deleted run's state must not reach a new run with its run_id."""

from airflow.sdk import dag, task


@dag(dag_id="e2e_rerun", schedule=None, catchup=False)
def e2e_rerun():
    @task
    def remember(task_state_store=None, dag_run=None):
        inherited = task_state_store.get("runs/seen")
        assert inherited is None, f"this run started with {inherited!r}"
        task_state_store.set("runs/seen", {"generation": dag_run.conf["generation"]})

    remember()


e2e_rerun()
