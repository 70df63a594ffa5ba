/**
 * Scale-out: the server on `effect/cluster`, with jobs and messages kept in
 * PostgreSQL (`effect/sql` over `@effect/sql-pg`).
 *
 * - **Model workers are entities** ({@link ModelWorker}): a job is a
 *   persisted `Run` message to the worker `model/slot` (the slot is a hash
 *   of the job id, so one model's jobs spread over many entities). The
 *   cluster shards the entities across **runner** processes; runners lock
 *   their shards in PostgreSQL and talk over sockets.
 * - **Jobs live in PostgreSQL** (`<prefix>_jobs`): the spec (graph and
 *   feeds as a tensor container), the state, the attempts, the result (the
 *   result container) or the error, and every event (`<prefix>_job_events`,
 *   with `NOTIFY` for followers). The HTTP **front** (`Server`'s API over
 *   {@link layerQueue}) admits a job, stores it, and sends its message; any
 *   front reads any job, so fronts can run on several machines.
 * - **A runner that dies loses no job.** Its shards move to the other
 *   runners once its locks expire (`leaseMs`), and the cluster redelivers
 *   the messages that have no reply. A redelivered job that had started
 *   runs again (its attempts count); after `maxAttempts` starts it is
 *   reported failed. A job's result is written once: every write is guarded
 *   by the claim of the runner that took it last, and a redelivered job that
 *   has finished is not run again.
 * - On each runner, one worker per model runs the jobs it was given with
 *   `Server.runGroup`, co-batching compatible trace jobs as the embedded
 *   server does.
 *
 * The embedded default (`Server.start`, `serve` without `--database`) is
 * unchanged: one process, an in-memory queue.
 *
 * @example
 * import * as Cluster from "nnsight-ts/remote/Cluster"
 * // a runner (one per machine or process)
 * const runner = await Cluster.startRunner({ database: "postgres://db/nnsight", models, runner: { host: "10.0.0.5", port: 34431 } })
 * // a front (HTTP API), on another machine
 * const front = await Cluster.start({ database: "postgres://db/nnsight", role: "front", models, keys, port: 8470 })
 *
 * @since 0.1.0
 */
import { randomUUID } from "node:crypto"
import { NodeClusterSocket, NodeCrypto } from "@effect/platform-node"
import { PgClient } from "@effect/sql-pg"
import {
  Cause,
  Context,
  Deferred,
  Duration,
  Effect,
  Exit,
  Latch,
  Layer,
  Option,
  PrimaryKey,
  Queue,
  Redacted,
  Schedule,
  Schema,
  Scope,
  Semaphore,
  Stream
} from "effect"
import {
  ClusterSchema,
  Entity,
  RunnerAddress,
  RunnerHealth,
  Runners,
  ShardingConfig,
  SocketRunner,
  SqlMessageStorage,
  SqlRunnerStorage
} from "effect/cluster"
import { Rpc, RpcSerialization } from "effect/rpc"
import { SqlClient } from "effect/sql"
import * as Graph from "../core/Graph.js"
import type { Tensor } from "../core/Tensor.js"
import * as Protocol from "./Protocol.js"
import * as Server from "./Server.js"

// ---------------------------------------------------------------------------
// The entity
// ---------------------------------------------------------------------------

/**
 * The payload of a job's message: its id (the message's primary key, so
 * sending it again is deduplicated).
 *
 * @since 0.1.0
 */
export class RunJob extends Schema.Class<RunJob>("nnsight-ts/remote/Cluster/RunJob")({ id: Schema.String }) {
  [PrimaryKey.symbol](): string {
    return this.id
  }
}

/**
 * Runs a stored job (persisted: redelivered until it has a reply).
 *
 * @since 0.1.0
 */
export const Run = Rpc.make("Run", { payload: RunJob }).annotate(ClusterSchema.Persisted, true)

/**
 * The model worker entity; its ids are `model/slot`.
 *
 * @since 0.1.0
 */
export const ModelWorker = Entity.make("nnsight-ts/ModelWorker", [Run])

/**
 * The worker entity a job goes to: `model/slot`, the slot a hash of the job id.
 *
 * @since 0.1.0
 */
export const entityIdOf = (model: string, jobId: string, slots: number): string => {
  let h = 0x811c9dc5
  for (let i = 0; i < jobId.length; i++) h = Math.imul(h ^ jobId.charCodeAt(i), 0x01000193)
  return `${model}/${(h >>> 0) % Math.max(1, slots)}`
}

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/**
 * What a process does: serve the HTTP API (`front`), run jobs (`runner`), or both.
 *
 * @since 0.1.0
 */
export type Role = "front" | "runner" | "both"

/**
 * Options of the cluster.
 *
 * @since 0.1.0
 */
export interface ClusterOptions {
  /** PostgreSQL, e.g. `postgres://user:pass@host:5432/nnsight` (the same for every process). */
  readonly database: string | Redacted.Redacted<string>
  /** Default `both`. */
  readonly role?: Role
  /**
   * Where other processes reach this runner (default 127.0.0.1:34431);
   * `listenHost` is the interface it listens on (default: `host`).
   */
  readonly runner?: { readonly host: string; readonly port: number; readonly listenHost?: string }
  /**
   * How long a runner's shard locks and heartbeat last (default 20 s): a
   * runner that stops answering loses its shards, and their jobs move on,
   * about this long after it died. Use the same value in every process.
   */
  readonly leaseMs?: number
  /** Starts of one job before it is reported failed (default 3). */
  readonly maxAttempts?: number
  /** Worker entities per model (default 64; the same in every process). */
  readonly slots?: number
  /** Prefix of the tables (and of the cluster's own; default `nnsight`). */
  readonly prefix?: string
  /** How often a follower of a job's events looks again without a notification (default 1000 ms). */
  readonly pollMs?: number
  /** Expert settings of the cluster (overrides what `leaseMs` sets). */
  readonly sharding?: Partial<ShardingConfig.ShardingConfig["Service"]>
  /** Most connections to PostgreSQL (default 10). */
  readonly maxConnections?: number
}

/**
 * Options of a cluster process that serves the API (the `Server` options and the cluster's).
 *
 * @since 0.1.0
 */
export interface StartOptions extends Server.StartOptions, ClusterOptions {}

const defaults = (o: ClusterOptions) => ({
  prefix: o.prefix ?? "nnsight",
  leaseMs: o.leaseMs ?? 20_000,
  maxAttempts: o.maxAttempts ?? 3,
  slots: o.slots ?? 64,
  pollMs: o.pollMs ?? 1000
})

// ---------------------------------------------------------------------------
// Storage
// ---------------------------------------------------------------------------

const active = ["queued", "running"] as const

/** A job spec as bytes: the feeds as tensors, the rest as JSON metadata. */
const encodeSpec = (spec: Server.JobSpec): Uint8Array =>
  Protocol.encodeTensors(spec.feeds, {
    spec: JSON.stringify({
      owner: spec.owner,
      limits: Object.fromEntries(Object.entries(spec.limits).map(([k, v]) => [k, Number.isFinite(v) ? v : String(v)])),
      model: spec.model,
      kind: spec.kind,
      graph: Graph.encode(spec.graph),
      rows: spec.rows,
      generate: spec.generate,
      coBatchKey: spec.coBatchKey
    })
  })

const decodeSpec = (bytes: Uint8Array): Server.JobSpec => {
  const { tensors, metadata } = Protocol.decodeTensors(bytes, { maxTensors: 1 << 20 })
  const s = JSON.parse(metadata.spec ?? "null") as Record<string, unknown> & { limits: Record<string, number | string> }
  return {
    owner: s.owner as string,
    limits: Object.fromEntries(Object.entries(s.limits).map(([k, v]) => [k, Number(v)])) as unknown as Protocol.Limits,
    model: s.model as string,
    kind: s.kind as Protocol.JobKind,
    graph: Graph.decode(s.graph),
    feeds: tensors as Readonly<Record<string, Tensor>>,
    rows: s.rows as Server.JobSpec["rows"],
    generate: (s.generate ?? undefined) as Protocol.GenerateOptions | undefined,
    coBatchKey: (s.coBatchKey ?? undefined) as string | undefined
  }
}

const encodeEvent = Schema.encodeSync(Protocol.JobEvent)
const decodeEvent = Schema.decodeUnknownSync(Protocol.JobEvent)
const encodeError = Schema.encodeSync(Protocol.JobError)
const decodeError = Schema.decodeUnknownSync(Protocol.JobError)

interface JobRow {
  readonly id: string
  readonly owner: string
  readonly model: string
  readonly kind: string
  readonly state: string
  readonly entity: string
  readonly attempts: number
  readonly runner: string | null
  readonly batched_with: number | null
  readonly error: unknown
  readonly submitted_at: bigint | number
  readonly started_at: bigint | number | null
  readonly finished_at: bigint | number | null
}

const statusColumns = "id, owner, model, kind, state, entity, attempts, runner, batched_with, error, submitted_at, started_at, finished_at"

const statusOf = (j: JobRow, position?: number): Protocol.JobStatus => ({
  id: j.id,
  model: j.model,
  kind: j.kind as Protocol.JobKind,
  state: j.state as Protocol.JobState,
  submittedAt: Number(j.submitted_at),
  ...(position === undefined ? {} : { position }),
  ...(j.batched_with === null ? {} : { batchedWith: j.batched_with }),
  ...(j.error === null || j.error === undefined ? {} : { error: decodeError(j.error) }),
  ...(j.started_at === null ? {} : { startedAt: Number(j.started_at) }),
  ...(j.finished_at === null ? {} : { finishedAt: Number(j.finished_at) })
})

/** The jobs' tables and every statement on them. */
const makeStore = (prefix: string) =>
  Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    const jobs = sql(`${prefix}_jobs`)
    const events = sql(`${prefix}_job_events`)
    const runs = sql(`${prefix}_runs`)
    const channel = `${prefix}_job_events`

    const migrate = sql.withTransaction(
      Effect.gen(function*() {
        // one process creates the tables; the others wait, then find them
        yield* sql`SELECT pg_advisory_xact_lock(hashtext(${`${prefix}:schema`}))`
        yield* sql`CREATE TABLE IF NOT EXISTS ${jobs} (
          id TEXT PRIMARY KEY,
          owner TEXT NOT NULL,
          model TEXT NOT NULL,
          kind TEXT NOT NULL,
          state TEXT NOT NULL,
          entity TEXT NOT NULL,
          spec BYTEA NOT NULL,
          attempts INTEGER NOT NULL DEFAULT 0,
          claim TEXT,
          runner TEXT,
          batched_with INTEGER,
          error JSONB,
          result BYTEA,
          submitted_at BIGINT NOT NULL,
          started_at BIGINT,
          finished_at BIGINT
        )`
        yield* sql`CREATE INDEX IF NOT EXISTS ${sql(`${prefix}_jobs_owner_active`)} ON ${jobs} (owner) WHERE state IN ('queued', 'running')`
        yield* sql`CREATE INDEX IF NOT EXISTS ${sql(`${prefix}_jobs_model_state`)} ON ${jobs} (model, state, submitted_at)`
        yield* sql`CREATE INDEX IF NOT EXISTS ${sql(`${prefix}_jobs_finished`)} ON ${jobs} (finished_at)`
        yield* sql`CREATE TABLE IF NOT EXISTS ${events} (
          seq BIGSERIAL PRIMARY KEY,
          job_id TEXT NOT NULL REFERENCES ${jobs} (id) ON DELETE CASCADE,
          event JSONB NOT NULL
        )`
        yield* sql`CREATE INDEX IF NOT EXISTS ${sql(`${prefix}_job_events_job`)} ON ${events} (job_id, seq)`
        yield* sql`CREATE TABLE IF NOT EXISTS ${runs} (
          id BIGSERIAL PRIMARY KEY,
          runner TEXT NOT NULL,
          jobs INTEGER NOT NULL,
          at BIGINT NOT NULL
        )`
      })
    )

    /** Appends events (in order) and wakes their followers. */
    const appendEvents = (rows: ReadonlyArray<{ readonly job: string; readonly event: Protocol.JobEvent | unknown }>) =>
      rows.length === 0
        ? Effect.void
        : Effect.gen(function*() {
          for (let i = 0; i < rows.length; i += 500) {
            const part = rows.slice(i, i + 500)
            const values = part.map((r) => ({ job_id: r.job, event: JSON.stringify(r.event) }))
            yield* sql`INSERT INTO ${events} ${sql.insert(values as unknown as readonly [Record<string, unknown>, ...Array<Record<string, unknown>>])}`
          }
          const ids = [...new Set(rows.map((r) => r.job))]
          yield* sql`SELECT pg_notify(${channel}, j) FROM unnest(${ids}::text[]) AS j`
        })

    const event = (job: string, e: Protocol.JobEvent) => ({ job, event: encodeEvent(e) })

    const find = (owner: string, id: string) =>
      Effect.flatMap(
        sql<JobRow>`SELECT ${sql.literal(statusColumns)} FROM ${jobs} WHERE id = ${id} AND owner = ${owner}`,
        (rows) => (rows.length === 0 ? Effect.fail(new Protocol.JobNotFound({ id })) : Effect.succeed(rows[0]))
      )

    const positionOf = (j: JobRow) =>
      j.state !== "queued"
        ? Effect.succeed(undefined)
        : Effect.map(
          sql<{ n: number }>`SELECT count(*)::int AS n FROM ${jobs}
            WHERE model = ${j.model} AND state = 'queued' AND (submitted_at, id) < (${j.submitted_at}, ${j.id})`,
          (rows) => rows[0].n
        )

    /** Stores an admitted job (queued), unless its key has too many unfinished jobs. */
    const insert = (id: string, entity: string, spec: Server.JobSpec) =>
      sql.withTransaction(
        Effect.gen(function*() {
          yield* sql`SELECT pg_advisory_xact_lock(hashtext(${`${prefix}:owner:${spec.owner}`}))`
          const [{ n }] = yield* sql<{ n: number }>`SELECT count(*)::int AS n FROM ${jobs} WHERE owner = ${spec.owner} AND state IN ${sql.in(active)}`
          if (n >= spec.limits.concurrentJobs) return yield* new Protocol.TooManyJobs({ active: n, max: spec.limits.concurrentJobs })
          const [{ q }] = yield* sql<{ q: number }>`SELECT count(*)::int AS q FROM ${jobs} WHERE model = ${spec.model} AND state = 'queued'`
          const now = Date.now()
          const rows = yield* sql<JobRow>`INSERT INTO ${jobs} ${
            sql.insert({
              id,
              owner: spec.owner,
              model: spec.model,
              kind: spec.kind,
              state: "queued",
              entity,
              spec: encodeSpec(spec),
              submitted_at: now
            })
          } RETURNING ${sql.literal(statusColumns)}`
          yield* appendEvents([event(id, { _tag: "Received", id, model: spec.model }), event(id, { _tag: "Queued", position: q })])
          return statusOf(rows[0], q)
        })
      )

    /** Ends a job that has not finished with an error (a failure, or a cancellation). */
    const end = (id: string, state: "failed" | "cancelled", error: Protocol.JobError, guard: { readonly owner?: string; readonly claim?: string } = {}) =>
      sql.withTransaction(
        Effect.gen(function*() {
          const rows = yield* sql<JobRow>`UPDATE ${jobs} SET state = ${state}, error = ${JSON.stringify(encodeError(error))}, finished_at = ${Date.now()}
            WHERE id = ${id} AND state IN ${sql.in(active)}
            ${guard.owner === undefined ? sql`` : sql`AND owner = ${guard.owner}`}
            ${guard.claim === undefined ? sql`` : sql`AND claim = ${guard.claim}`}
            RETURNING ${sql.literal(statusColumns)}`
          if (rows.length > 0) yield* appendEvents([event(id, { _tag: "Failed", error })])
          return rows.length > 0
        })
      )

    /**
     * A runner takes a delivered job: it becomes the job's claim (older
     * claims can no longer write). A job that had started (its runner died
     * or let it go) counts an attempt; one out of attempts is reported failed.
     */
    const claim = (id: string, claimId: string, runner: string, maxAttempts: number) =>
      sql.withTransaction(
        Effect.gen(function*() {
          const rows = yield* sql<{ state: string; attempts: number; spec: Uint8Array }>`SELECT state, attempts, spec FROM ${jobs} WHERE id = ${id} FOR UPDATE`
          if (rows.length === 0) return undefined
          const { attempts, spec, state } = rows[0]
          if (state !== "queued" && state !== "running") return undefined
          if (state === "running" && attempts >= maxAttempts) {
            yield* end(
              id,
              "failed",
              new Protocol.InternalError({
                reason: `the job was started ${attempts} times and each time its runner stopped before it finished; it is not retried again`
              })
            )
            return undefined
          }
          yield* sql`UPDATE ${jobs} SET claim = ${claimId}, runner = ${runner}, state = 'queued', batched_with = NULL WHERE id = ${id}`
          // a job whose runner stopped while running it is queued again
          if (state === "running") yield* appendEvents([event(id, { _tag: "Queued", position: 0 })])
          return { spec: decodeSpec(spec), attempts }
        })
      )

    /** A claim lets its job go (its handler was interrupted: the shard moved, or the runner stops). */
    const release = (id: string, claimId: string) =>
      sql.withTransaction(
        Effect.gen(function*() {
          const rows = yield* sql<{ state: string }>`SELECT state FROM ${jobs} WHERE id = ${id} AND claim = ${claimId} FOR UPDATE`
          if (rows.length === 0 || (rows[0].state !== "queued" && rows[0].state !== "running")) return
          // an attempt cut short by a graceful stop does not count
          yield* sql`UPDATE ${jobs} SET state = 'queued', claim = NULL, runner = NULL,
            attempts = CASE WHEN state = 'running' THEN attempts - 1 ELSE attempts END
            WHERE id = ${id}`
          if (rows[0].state === "running") yield* appendEvents([event(id, { _tag: "Queued", position: 0 })])
        })
      )

    /** Marks claimed jobs running; gives back those still theirs to run. */
    const start = <J extends { readonly id: string; readonly claim: string }>(group: ReadonlyArray<J>, runner: string) =>
      sql.withTransaction(
        Effect.gen(function*() {
          const now = Date.now()
          const ok: Array<J> = []
          for (const j of group) {
            const rows = yield* sql`UPDATE ${jobs} SET state = 'running', attempts = attempts + 1, started_at = ${now}
              WHERE id = ${j.id} AND claim = ${j.claim} AND state = 'queued' RETURNING id`
            if (rows.length > 0) ok.push(j)
          }
          if (ok.length === 0) return ok
          yield* sql`UPDATE ${jobs} SET batched_with = ${ok.length} WHERE id IN ${sql.in(ok.map((j) => j.id))}`
          yield* sql`INSERT INTO ${runs} ${sql.insert({ runner, jobs: ok.length, at: now })}`
          yield* appendEvents(ok.map((j) => event(j.id, { _tag: "Running", batchedWith: ok.length })))
          return ok
        })
      )

    /** Writes a job's outcome, if the claim is still the job's (else the result is dropped). */
    const finish = (id: string, claimId: string, outcome: Server.JobOutcome) =>
      Effect.gen(function*() {
        let o = outcome
        let bytes: Uint8Array | undefined
        if (o._tag === "Done") {
          const encoded = yield* Schema.encodeEffect(Protocol.ResultBody)(o.result).pipe(Effect.exit)
          if (Exit.isSuccess(encoded)) bytes = encoded.value
          else o = { _tag: "Failed", error: new Protocol.InternalError({ reason: `cannot encode the result: ${Cause.pretty(encoded.cause)}` }) }
        }
        if (o._tag === "Failed") return yield* end(id, "failed", o.error, { claim: claimId })
        const result = (o as Extract<Server.JobOutcome, { _tag: "Done" }>).result
        return yield* sql.withTransaction(
          Effect.gen(function*() {
            const now = Date.now()
            const rows = yield* sql<{ started_at: bigint | number | null }>`UPDATE ${jobs} SET state = 'completed', result = ${bytes!}, finished_at = ${now}
              WHERE id = ${id} AND claim = ${claimId} AND state = 'running' RETURNING started_at`
            if (rows.length === 0) return false
            const startedAt = rows[0].started_at === null ? now : Number(rows[0].started_at)
            yield* appendEvents([event(id, { _tag: "Completed", elapsedMs: now - startedAt, resultBytes: Protocol.resultBytes(result) })])
            return true
          })
        )
      })

    const status = (owner: string, id: string) =>
      Effect.gen(function*() {
        const j = yield* find(owner, id)
        return statusOf(j, yield* positionOf(j))
      })

    const result = (owner: string, id: string) =>
      Effect.gen(function*() {
        const rows = yield* sql<{ state: string; result: Uint8Array | null; error: unknown }>`SELECT state, result, error FROM ${jobs} WHERE id = ${id} AND owner = ${owner}`
        if (rows.length === 0) return yield* new Protocol.JobNotFound({ id })
        const { error, result, state } = rows[0]
        if (state === "completed" && result !== null) return yield* Schema.decodeUnknownEffect(Protocol.ResultBody)(result).pipe(Effect.orDie)
        if (error !== null && error !== undefined) return yield* new Protocol.JobFailed({ id, error: decodeError(error) })
        return yield* new Protocol.NotReady({ id, state })
      })

    const eventsAfter = (id: string, after: bigint | number) =>
      sql<{ seq: bigint; event: unknown }>`SELECT seq, event FROM ${events} WHERE job_id = ${id} AND seq > ${after} ORDER BY seq`

    const stats = Effect.gen(function*() {
      const [j] = yield* sql<{ submitted: number; completed: number; failed: number; queued: number; running: number }>`SELECT
        count(*)::int AS submitted,
        count(*) FILTER (WHERE state = 'completed')::int AS completed,
        count(*) FILTER (WHERE state IN ('failed', 'cancelled'))::int AS failed,
        count(*) FILTER (WHERE state = 'queued')::int AS queued,
        count(*) FILTER (WHERE state = 'running')::int AS running
        FROM ${jobs}`
      const [r] = yield* sql<{ runs: number; co_runs: number; co_jobs: number; largest: number }>`SELECT
        count(*)::int AS runs,
        count(*) FILTER (WHERE jobs > 1)::int AS co_runs,
        coalesce(sum(jobs) FILTER (WHERE jobs > 1), 0)::int AS co_jobs,
        coalesce(max(jobs), 0)::int AS largest
        FROM ${runs}`
      return { ...j, runs: r.runs, coBatchedRuns: r.co_runs, coBatchedJobs: r.co_jobs, largestBatch: r.largest }
    })

    /** Queued jobs no runner has taken for a while (their message may not have been sent). */
    const orphans = (olderThan: number) =>
      sql<{ id: string; entity: string }>`SELECT id, entity FROM ${jobs}
        WHERE state = 'queued' AND runner IS NULL AND submitted_at < ${olderThan} ORDER BY submitted_at LIMIT 256`

    /** Deletes finished jobs older than `before`, and their processed messages. */
    const sweep = (before: number) =>
      Effect.gen(function*() {
        const gone = yield* sql<{ id: string; entity: string }>`DELETE FROM ${jobs}
          WHERE id IN (SELECT id FROM ${jobs} WHERE finished_at < ${before} LIMIT 1000) RETURNING id, entity`
        yield* sql`DELETE FROM ${runs} WHERE at < ${before}`
        if (gone.length === 0) return 0
        const messageIds = gone.map((g) => `${ModelWorker.type}/${g.entity}/${Run._tag}/${g.id}`)
        const messages = sql(`${prefix}_messages`)
        const replies = sql(`${prefix}_replies`)
        yield* sql`DELETE FROM ${replies} WHERE request_id IN (SELECT id FROM ${messages} WHERE processed AND message_id IN ${sql.in(messageIds)})`
        yield* sql`DELETE FROM ${messages} WHERE processed AND message_id IN ${sql.in(messageIds)}`
        return gone.length
      })

    return {
      channel,
      migrate,
      appendEvents,
      insert,
      end,
      claim,
      release,
      start,
      finish,
      find,
      status,
      result,
      eventsAfter,
      stats,
      orphans,
      sweep
    }
  })

type Store = Effect.Success<ReturnType<typeof makeStore>>

const dbRetry = Effect.retry({ times: 5, schedule: Schedule.exponential("100 millis") })

// ---------------------------------------------------------------------------
// Runners
// ---------------------------------------------------------------------------

interface Entry {
  readonly id: string
  readonly claim: string
  readonly spec: Server.JobSpec
  readonly done: Deferred.Deferred<void>
}

/**
 * The jobs a runner was given, and the workers that run them: one per
 * hosted model, co-batching compatible trace jobs.
 *
 * @since 0.1.0
 */
export class RunnerWorkers extends Context.Service<RunnerWorkers, {
  /** Runs a delivered job to its end (or until interrupted). */
  readonly run: (id: string) => Effect.Effect<void>
}>()("nnsight-ts/remote/Cluster/RunnerWorkers") {}

/**
 * Options of a runner's workers.
 *
 * @since 0.1.0
 */
export interface RunnerWorkerOptions {
  /** How the runner names itself in the job table (its address). */
  readonly name: string
  readonly prefix: string
  readonly maxAttempts: number
  readonly coBatch?: Server.CoBatchOptions
}


/**
 * A runner's workers (needs the hosted models and PostgreSQL).
 *
 * @since 0.1.0
 */
export const layerRunnerWorkers = (options: RunnerWorkerOptions) =>
  Layer.effect(
    RunnerWorkers,
    Effect.gen(function*() {
      const store = yield* makeStore(options.prefix)
      const registry = yield* Server.Registry
      const coBatch = options.coBatch ?? { enabled: true }
      const maxRows = coBatch.maxRows ?? 16
      const maxJobs = coBatch.maxJobs ?? 16
      const queues = new Map<string, Server.WorkQueue<Entry>>()

      // log lines and tokens are written in batches
      const buffer: Array<{ job: string; event: unknown }> = []
      const flushLock = Semaphore.makeUnsafe(1)
      const flush = flushLock.withPermit(
        Effect.suspend(() => {
          if (buffer.length === 0) return Effect.void
          const rows = buffer.splice(0)
          return store.appendEvents(rows).pipe(
            dbRetry,
            Effect.catchCause((cause) => Effect.logWarning("nnsight-ts runner: could not write job events", cause))
          )
        })
      )
      yield* Effect.forkScoped(Effect.forever(Effect.andThen(Effect.sleep(50), flush)))


      const runGroup = (hosted: Server.Hosted, group: ReadonlyArray<Entry>) =>
        Effect.gen(function*() {
          const started = yield* store.start(group, options.name).pipe(dbRetry)
          for (const e of group) if (!started.includes(e)) Deferred.doneUnsafe(e.done, Exit.void)
          if (started.length === 0) return
          const outcomes = yield* Server.runGroup(hosted, started.map((e) => e.spec), {
            event: (k, e) => {
              buffer.push({ job: started[k].id, event: encodeEvent(e) })
            }
          }).pipe(
            Effect.catchCause((cause) =>
              Effect.succeed(started.map((): Server.JobOutcome => ({ _tag: "Failed", error: Server.defectError(cause) })))
            )
          )
          yield* flush
          for (let k = 0; k < started.length; k++) {
            yield* store.finish(started[k].id, started[k].claim, outcomes[k]).pipe(dbRetry)
            Deferred.doneUnsafe(started[k].done, Exit.void)
          }
        })

      const worker = (hosted: Server.Hosted, q: Server.WorkQueue<Entry>) =>
        Effect.gen(function*() {
          while (true) {
            const group = yield* Server.nextGroup(q, { enabled: coBatch.enabled, maxJobs, maxRows })
            const exit = yield* Effect.exit(runGroup(hosted, group))
            // the database failed: the handlers fail, and the cluster delivers the jobs again
            if (Exit.isFailure(exit)) {
              yield* Effect.logWarning("nnsight-ts runner: a run could not be recorded", exit.cause)
              for (const e of group) Deferred.doneUnsafe(e.done, Exit.die(Cause.squash(exit.cause)))
            }
            yield* Effect.yieldNow
          }
        })

      for (const hosted of registry.list) {
        const q = { pending: new Array<Entry>(), latch: Latch.makeUnsafe(false) }
        queues.set(hosted.key, q)
        yield* Effect.forkScoped(worker(hosted, q))
      }

      const run = (id: string): Effect.Effect<void> =>
        Effect.gen(function*() {
          const claimId = randomUUID()
          const claimed = yield* store.claim(id, claimId, options.name, options.maxAttempts).pipe(dbRetry, Effect.orDie)
          if (claimed === undefined) return
          const q = queues.get(claimed.spec.model)
          if (q === undefined) {
            yield* store.end(id, "failed", new Protocol.InternalError({ reason: `runner ${options.name} does not host model "${claimed.spec.model}"` }), {
              claim: claimId
            }).pipe(dbRetry, Effect.orDie)
            return
          }
          const entry: Entry = { id, claim: claimId, spec: claimed.spec, done: Deferred.makeUnsafe<void>() }
          q.pending.push(entry)
          q.latch.openUnsafe()
          yield* Deferred.await(entry.done).pipe(
            Effect.onInterrupt(() =>
              Effect.suspend(() => {
                const k = q.pending.indexOf(entry)
                if (k >= 0) q.pending.splice(k, 1)
                return store.release(id, claimId).pipe(dbRetry, Effect.ignore)
              })
            )
          )
        })

      return RunnerWorkers.of({ run })
    })
  )

/**
 * The worker entities of a runner: each delivered `Run` goes to this
 * runner's {@link RunnerWorkers} (concurrently: a model's worker batches them).
 *
 * @since 0.1.0
 */
export const layerEntities = ModelWorker.toLayer(
  Effect.gen(function*() {
    const workers = yield* RunnerWorkers
    return ModelWorker.of({ Run: ({ payload }) => workers.run(payload.id) })
  }),
  { concurrency: "unbounded", maxIdleTime: "10 minutes" }
)

// ---------------------------------------------------------------------------
// The front's queue
// ---------------------------------------------------------------------------

/**
 * Options of the cluster-backed queue.
 *
 * @since 0.1.0
 */
export interface QueueOptions {
  readonly prefix: string
  readonly slots: number
  readonly pollMs: number
  /** How long finished jobs' results are kept (default 10 minutes). */
  readonly resultTtlMs?: number
}

/**
 * The cluster-backed {@link Server.JobQueue}: jobs stored in PostgreSQL and
 * sent to their {@link ModelWorker} (needs the cluster's `Sharding`, a
 * `PgClient` and the {@link Server.Registry}).
 *
 * @since 0.1.0
 */
export const layerQueue = (options: QueueOptions) =>
  Layer.effect(
    Server.JobQueue,
    Effect.gen(function*() {
      const store: Store = yield* makeStore(options.prefix)
      const pg = yield* PgClient.PgClient
      const clientFor = yield* ModelWorker.client
      const ttl = options.resultTtlMs ?? 10 * 60_000
      let rejected = 0

      const send = (id: string, entity: string) => clientFor(entity).Run(new RunJob({ id }), { discard: true })

      // followers of a job's events wake on NOTIFY (and look again every pollMs anyway)
      interface Sub {
        pending: boolean
        wake: (() => void) | undefined
      }
      const subs = new Map<string, Set<Sub>>()
      const notified = (id: string) => {
        const set = subs.get(id)
        if (set === undefined) return
        for (const s of set) {
          s.pending = true
          s.wake?.()
        }
      }
      yield* Effect.gen(function*() {
        const q = yield* pg.listen(store.channel)
        while (true) notified((yield* Queue.take(q)).payload)
      }).pipe(
        Effect.scoped,
        Effect.catchCause((cause) => Effect.logDebug("nnsight-ts front: LISTEN ended", cause)),
        Effect.repeat(Schedule.spaced("1 second")),
        Effect.forkScoped
      )
      const waitFor = (sub: Sub) =>
        sub.pending
          ? Effect.void
          : Effect.callback<void>((resume) => {
            let done = false
            const wake = () => {
              if (done) return
              done = true
              clearTimeout(timer)
              sub.wake = undefined
              resume(Effect.void)
            }
            const timer = setTimeout(wake, options.pollMs)
            sub.wake = wake
            return Effect.sync(() => {
              done = true
              clearTimeout(timer)
              sub.wake = undefined
            })
          })

      // finished jobs expire; queued jobs nobody took are sent again (a duplicate is ignored)
      yield* Effect.gen(function*() {
        yield* store.sweep(Date.now() - ttl)
        for (const o of yield* store.orphans(Date.now() - 15_000)) yield* Effect.ignore(send(o.id, o.entity))
      }).pipe(
        Effect.catchCause((cause) => Effect.logDebug("nnsight-ts front: sweep failed", cause)),
        Effect.andThen(Effect.sleep(Duration.millis(Math.max(1000, Math.min(30_000, ttl / 4))))),
        Effect.forever,
        Effect.forkScoped
      )

      const service: Server.JobQueueService = {
        submit: (spec) =>
          Effect.gen(function*() {
            const id = randomUUID()
            const entity = entityIdOf(spec.model, id, options.slots)
            const status = yield* store.insert(id, entity, spec)
            const sent = yield* Effect.exit(send(id, entity))
            if (Exit.isSuccess(sent)) return status
            // never silently dropped: a job that cannot be queued is reported failed
            const error = new Protocol.InternalError({ reason: `the job could not be queued: ${Cause.pretty(sent.cause)}` })
            yield* store.end(id, "failed", error)
            return { ...status, state: "failed" as const, error, finishedAt: Date.now() }
          }).pipe(Effect.catchTag("SqlError", Effect.die)),
        status: (owner, id) => store.status(owner, id).pipe(Effect.catchTag("SqlError", Effect.die)),
        events: (owner, id) =>
          Effect.map(store.find(owner, id).pipe(Effect.catchTag("SqlError", Effect.die)), () =>
            Stream.suspend(() => {
              const sub: Sub = { pending: false, wake: undefined }
              let set = subs.get(id)
              if (set === undefined) subs.set(id, (set = new Set()))
              set.add(sub)
              const unsubscribe = Effect.sync(() => {
                set.delete(sub)
                if (set.size === 0 && subs.get(id) === set) subs.delete(id)
              })
              return Stream.paginate({ after: 0n as bigint | number, first: true }, (s) =>
                Effect.gen(function*() {
                  if (!s.first) yield* waitFor(sub)
                  sub.pending = false
                  const rows = yield* store.eventsAfter(id, s.after)
                  const out = rows.map((r) => decodeEvent(r.event))
                  const after = rows.length === 0 ? s.after : rows[rows.length - 1].seq
                  const ended = out.some(Protocol.isTerminal)
                  return [out, ended ? Option.none() : Option.some({ after, first: false })] as const
                }).pipe(Effect.orDie)).pipe(Stream.ensuring(unsubscribe))
            })),
        ended: (owner, id) => Effect.flatMap(service.events(owner, id), Server.logsUntilEnd),
        result: (owner, id) => store.result(owner, id).pipe(Effect.catchTag("SqlError", Effect.die)),
        cancel: (owner, id) =>
          Effect.gen(function*() {
            yield* store.find(owner, id)
            yield* store.end(id, "cancelled", new Protocol.JobCancelled({ id }), { owner })
            return yield* store.status(owner, id)
          }).pipe(Effect.catchTag("SqlError", Effect.die)),
        stats: store.stats.pipe(
          Effect.map((s) => ({ ...s, rejected })),
          Effect.orDie
        ),
        rejected: Effect.sync(() => {
          rejected++
        })
      }
      return service
    })
  )

// ---------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------

const shardingConfig = (o: ClusterOptions, runner: boolean): Partial<ShardingConfig.ShardingConfig["Service"]> => {
  const { leaseMs } = defaults(o)
  const address = o.runner ?? { host: "127.0.0.1", port: 34431 }
  return {
    runnerAddress: runner ? Option.some(RunnerAddress.RunnerAddress.make({ host: address.host, port: address.port })) : Option.none(),
    runnerListenAddress: runner && o.runner?.listenHost !== undefined
      ? Option.some(RunnerAddress.RunnerAddress.make({ host: o.runner.listenHost, port: address.port }))
      : Option.none(),
    shardLockExpiration: Duration.millis(leaseMs),
    shardLockRefreshInterval: Duration.millis(Math.min(10_000, leaseMs / 4)),
    runnerHealthCheckInterval: Duration.millis(Math.min(60_000, leaseMs / 2)),
    refreshAssignmentsInterval: Duration.millis(Math.min(3_000, leaseMs / 4)),
    entityMessagePollInterval: Duration.millis(Math.min(10_000, leaseMs / 4)),
    ...o.sharding
  }
}

/**
 * The cluster's `Sharding` for this process, over PostgreSQL (messages,
 * runners, shard locks) and sockets: a runner (hosts entities, listens at
 * its address) or a client only (a front).
 *
 * @since 0.1.0
 */
export const layerSharding = (options: ClusterOptions, runner: boolean) => {
  const { prefix } = defaults(options)
  const config = ShardingConfig.layer({ ...ShardingConfig.defaults, ...shardingConfig(options, runner) })
  const transport = runner
    ? Layer.provide(SocketRunner.layer, [NodeClusterSocket.layerSocketServer, NodeClusterSocket.layerClientProtocol])
    : Layer.provide(SocketRunner.layerClientOnly, NodeClusterSocket.layerClientProtocol)
  const health = runner
    ? RunnerHealth.layerPing.pipe(Layer.provide(Runners.layerRpc), Layer.provide(NodeClusterSocket.layerClientProtocol))
    : RunnerHealth.layerNoop
  return transport.pipe(
    Layer.provide(health),
    Layer.provideMerge(SqlMessageStorage.layerWith({ prefix }).pipe(Layer.provide(NodeCrypto.layerDigest))),
    Layer.provide(Layer.orDie(SqlRunnerStorage.layerWith({ prefix }))),
    Layer.provide(config),
    Layer.provide(RpcSerialization.layerSchemaBinary())
  )
}

/**
 * PostgreSQL (`PgClient`), with the jobs' tables created.
 *
 * @since 0.1.0
 */
export const layerDatabase = (options: ClusterOptions) => {
  const { prefix } = defaults(options)
  const url = typeof options.database === "string" ? Redacted.make(options.database) : options.database
  return Layer.effectDiscard(Effect.flatMap(makeStore(prefix), (s) => s.migrate)).pipe(
    Layer.provideMerge(
      PgClient.layer({
        url,
        maxConnections: options.maxConnections ?? 10,
        applicationName: "nnsight-ts",
        // results and specs are stored whole (bytea), up to PostgreSQL's 1 GiB
        maxMessageSize: 1 << 30
      })
    )
  )
}

/**
 * A runner's name in the job table (its address).
 *
 * @since 0.1.0
 */
export const runnerName = (options: ClusterOptions): string => {
  const a = options.runner ?? { host: "127.0.0.1", port: 34431 }
  return `${a.host}:${a.port}`
}

const runnerPart = (options: ClusterOptions & { readonly coBatch?: boolean; readonly coBatchMaxRows?: number; readonly coBatchMaxJobs?: number }) => {
  const { maxAttempts, prefix } = defaults(options)
  return layerEntities.pipe(
    Layer.provide(
      layerRunnerWorkers({
        name: runnerName(options),
        prefix,
        maxAttempts,
        coBatch: { enabled: options.coBatch ?? true, maxRows: options.coBatchMaxRows, maxJobs: options.coBatchMaxJobs }
      })
    )
  )
}

/**
 * A runner process (no HTTP): hosts the models and runs the jobs its shards receive.
 *
 * @since 0.1.0
 */
export const layerRunner = (
  options: ClusterOptions & {
    readonly models: Server.StartOptions["models"]
    readonly coBatch?: boolean
    readonly coBatchMaxRows?: number
    readonly coBatchMaxJobs?: number
  }
) =>
  runnerPart(options).pipe(
    Layer.provide(Server.Registry.layer(options.models)),
    Layer.provideMerge(layerSharding(options, true)),
    Layer.provideMerge(layerDatabase(options))
  )

/**
 * A process that serves the HTTP API on the cluster (role `front`), and
 * also runs jobs (role `both`, the default).
 *
 * @since 0.1.0
 */
export const layer = (options: StartOptions) => {
  const { pollMs, prefix, slots } = defaults(options)
  const role = options.role ?? "both"
  if (role === "runner") throw new Error("Cluster.layer serves the API: use layerRunner for a runner without one")
  const http = Server.layerWith(options, layerQueue({ prefix, slots, pollMs, resultTtlMs: options.resultTtlMs }))
  const parts = role === "both" ? Layer.merge(http, runnerPart(options).pipe(Layer.provide(Server.Registry.layer(options.models)))) : http
  return parts.pipe(
    Layer.provideMerge(layerSharding(options, role === "both")),
    Layer.provideMerge(layerDatabase(options))
  )
}

/**
 * Starts a front (or front and runner) in this process.
 *
 * @example
 * const front = await Cluster.start({ database, role: "front", models, keys, port: 8470 })
 *
 * @since 0.1.0
 */
export const start = (options: StartOptions): Promise<Server.Running> => Server.startLayer(layer(options), options.host)

/**
 * A runner started in this process.
 *
 * @since 0.1.0
 */
export interface RunningRunner {
  readonly name: string
  /** Hands its shards to the other runners and stops (models stay open). */
  readonly close: () => Promise<void>
}

/**
 * Starts a runner in this process.
 *
 * @since 0.1.0
 */
export const startRunner = async (options: Parameters<typeof layerRunner>[0]): Promise<RunningRunner> => {
  const scope = Effect.runSync(Scope.make())
  try {
    await Effect.runPromise(Layer.buildWithScope(layerRunner(options), scope))
    return { name: runnerName(options), close: () => Effect.runPromise(Scope.close(scope, Exit.void)) }
  } catch (e) {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    throw e
  }
}
