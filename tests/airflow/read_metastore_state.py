"""Reads state rows with Apache Airflow's own MetastoreBackend (the default state backend
of Airflow 3.3), to show that rows `airstate export --to-metastore` wrote are what Airflow
reads back.

stdin: {"tasks": [[dag_id, run_id, task_id, map_index, key], ...], "assets": [[asset_id, key], ...]}
stdout: {"tasks": [answer, ...], "assets": [answer, ...]} in the same order, where an answer
is null when Airflow finds no row, else {"raw": <the stored text>, "value": <json.loads of it,
as Airflow's Execution API decodes it>}.
AIRFLOW__DATABASE__SQL_ALCHEMY_CONN names the database.
"""

import json
import sys

from airflow._shared.state import AssetScope, TaskScope
from airflow.state.metastore import MetastoreBackend


def answer(raw):
    if raw is None:
        return None
    return {"raw": raw, "value": json.loads(raw)}


def main():
    asked = json.load(sys.stdin)
    backend = MetastoreBackend()
    tasks = [
        answer(backend.get(TaskScope(dag_id=d, run_id=r, task_id=t, map_index=m), key))
        for d, r, t, m, key in asked["tasks"]
    ]
    assets = [answer(backend.get(AssetScope(asset_id=a), key)) for a, key in asked["assets"]]
    json.dump({"tasks": tasks, "assets": assets}, sys.stdout)


if __name__ == "__main__":
    main()
