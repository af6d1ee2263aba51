-- Lists a task of a DAG run in the lifecycle index, before the task's first state is
-- written, so that a pass can find the state once Airflow deletes the run.
--
-- KEYS[1] index shard zset   member = dag_run.id, score = 0, or when the run was found
--                            deleted, the time (ms) of that first reclaim
-- KEYS[2] the run's hash      "dag_id", "run_id", and "t:<task_id>" per task holding state
-- ARGV: dag_run.id, dag_id, run_id, task_id
-- Both keys share the shard's hash tag: one Cluster slot. NX keeps a mark already set,
-- so a late write to a run being reclaimed is reclaimed too.
redis.call('ZADD', KEYS[1], 'NX', 0, ARGV[1])
redis.call('HSET', KEYS[2], 'dag_id', ARGV[2], 'run_id', ARGV[3], 't:' .. ARGV[4], '1')
return 1
