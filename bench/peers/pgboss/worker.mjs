// One pg-boss burn-down: install, enqueue N no-ops, drain them, print one JSON line.
//
// Runs with Node from this folder's node_modules (package.json pins pg-boss; `make
// bench-peers` runs `npm install` here when node and npm are on PATH). The orchestrator
// (bench/peers/__main__.py) starts it once per grid point.
//
// 1. `new PgBoss({ schema })` with a fresh schema name; `start()` creates pg-boss's
//    tables there (its own migrations), `createQueue` the queue (standard policy).
// 2. Enqueues --jobs jobs with one `insert(name, jobs)` call.
// 3. `work(name, { batchSize, localConcurrency, burstWhenBatchFull })`: --workers
//    pollers, each fetching --batch jobs at a time; the handler gets the batch, does
//    nothing, and pg-boss completes the batch in one statement when it returns. So
//    workers x batch is the number of jobs in flight (the grid keeps it at C).
//    `burstWhenBatchFull` makes a poller fetch again at once after a full batch instead
//    of waiting out `pollingIntervalSeconds` (2 s by default, 0.5 s at least), which
//    would otherwise cap a burn-down at batch / 0.5 s per poller. --pool sets `max`,
//    pg-boss's pool size.
// 4. Throughput from pg-boss's own job table, like the dispatcher's burn-down reads
//    its jobs table: completed jobs / (last `completed_on` - first `started_on`), on
//    the database clock. The in-process wall time to the last completion (polled every
//    100 ms) is printed beside it.
// 5. Stops pg-boss and drops the schema.
//
//   node bench/peers/pgboss/worker.mjs --dsn DSN --jobs 20000 --concurrency 100 \
//       --workers 1 --batch 100 --pool 10

import { parseArgs } from "node:util";
import { randomUUID } from "node:crypto";
import pg from "pg";
import { PgBoss } from "pg-boss";

const QUEUE = "noop";

const { values } = parseArgs({
  options: {
    dsn: { type: "string" },
    jobs: { type: "string", default: "20000" },
    concurrency: { type: "string", default: "100" },
    workers: { type: "string", default: "1" },
    batch: { type: "string", default: "100" },
    pool: { type: "string", default: "10" },
  },
});
const jobs = Number(values.jobs);
const workers = Number(values.workers);
const batch = Number(values.batch);
const pool = Number(values.pool);
const schema = `peer_pgboss_${randomUUID().replaceAll("-", "").slice(0, 8)}`;

const admin = new pg.Client({ connectionString: values.dsn });
await admin.connect();
let row;
let wall;
try {
  const boss = new PgBoss({ connectionString: values.dsn, schema, max: pool });
  // pg-boss emits its errors as events; without a listener Node would crash on one.
  boss.on("error", (error) => console.error(`pg-boss error: ${error.message}`));
  await boss.start();
  await boss.createQueue(QUEUE);
  await boss.insert(
    QUEUE,
    Array.from({ length: jobs }, () => ({ data: {} })),
  );
  await admin.query(`VACUUM ANALYZE "${schema}".job`);

  const started = performance.now();
  await boss.work(
    QUEUE,
    { batchSize: batch, localConcurrency: workers, burstWhenBatchFull: true },
    async () => {},
  );
  for (;;) {
    const left = await admin.query(
      `SELECT count(*)::int AS n FROM "${schema}".job WHERE state <> 'completed'`,
    );
    if (left.rows[0].n === 0) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  wall = (performance.now() - started) / 1000;
  await boss.stop({ graceful: true, timeout: 30000 });

  const result = await admin.query(
    `SELECT count(*) FILTER (WHERE state = 'completed')::int AS done,
            extract(epoch FROM max(completed_on) - min(started_on))::float8 AS seconds
     FROM "${schema}".job`,
  );
  row = result.rows[0];
} finally {
  await admin.query(`DROP SCHEMA IF EXISTS "${schema}" CASCADE`);
  await admin.end();
}
if (row.done !== jobs) {
  throw new Error(`${row.done} of ${jobs} jobs completed`);
}
console.log(
  JSON.stringify({
    peer: "pgboss",
    config: { concurrency: Number(values.concurrency), workers, batch, pool },
    jobs: row.done,
    seconds: row.seconds,
    rate: row.done / row.seconds,
    wall_rate: row.done / wall,
  }),
);
