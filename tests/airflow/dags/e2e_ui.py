"""A worker writes a key that the test then looks for in Airflow's own UI."""

from airflow.sdk import dag, task


@dag(dag_id="e2e_ui", schedule=None, catchup=False)
def e2e_ui():
    @task
    def write(task_state_store=None, dag_run=None):
        task_state_store.set("shown/in-the-ui", {"written_by": "worker", "marker": dag_run.conf["marker"]})

    write()


e2e_ui()
