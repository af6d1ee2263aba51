"""A Variable and an XCom: Execution API routes that airstate forwards to Airflow."""

from airflow.sdk import Variable, dag, task


@dag(dag_id="e2e_forwarded", schedule=None, catchup=False)
def e2e_forwarded():
    @task
    def push():
        return {"variable": Variable.get("e2e_variable"), "from": "push"}

    @task
    def pull(pushed):
        assert pushed == {"variable": "through the front door", "from": "push"}, pushed

    pull(push())


e2e_forwarded()
