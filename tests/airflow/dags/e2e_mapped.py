"""A task mapped over 3, each map index keeping its own keys (which hold `/`)."""

from airflow.sdk import dag, task


@dag(dag_id="e2e_mapped", schedule=None, catchup=False)
def e2e_mapped():
    @task
    def each(n, task_state_store=None):
        key = f"part/{n}/of/3"
        for other in range(3):
            found = task_state_store.get(f"part/{other}/of/3")
            assert found is None, f"map index {n} sees {found!r} before writing"
        task_state_store.set(key, {"n": n})
        task_state_store.set("shared/name", f"index-{n}")
        assert task_state_store.get(key) == {"n": n}
        assert task_state_store.get("shared/name") == f"index-{n}"

    each.expand(n=[0, 1, 2])


e2e_mapped()
