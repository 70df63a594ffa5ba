/**
 * Scale-out on PostgreSQL (`Cluster`): a front in this process and two
 * runner processes (the `serve --database --role runner` command line),
 * all on a database of their own (created here, dropped at the end).
 *
 * (1) Fault: generations and traces are submitted, and one runner process
 *     is SIGKILLed while it runs a job. Every job ends: completed with the
 *     values a local run gives, or failed with a reported error; none is
 *     lost, none completes twice (one terminal event each), and the job
 *     that was running on the killed runner started again elsewhere.
 * (2) Job handles on the cluster: status, events, result, re-attach,
 *     another key's jobs are invisible, cancellation of a queued job.
 *
 * PostgreSQL must be reachable (NNSIGHT_TEST_PG, default
 * postgres://postgres@127.0.0.1:5432 with trust auth): without it the
 * tests fail, they are not skipped.
 */
import type { ChildProcess } from "node:child_process"
import { randomBytes } from "node:crypto"
import { createServer } from "node:net"
import * as path from "node:path"
import { PgClient } from "@effect/sql-pg"
import { Effect, ManagedRuntime, Redacted } from "effect"
import { SqlClient } from "effect/sql"
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { LanguageModel, Tensor } from "../src/index.js"
import * as Remote from "../src/remote/Client.js"
import * as Cluster from "../src/remote/Cluster.js"
import * as Protocol from "../src/remote/Protocol.js"
import type * as Server from "../src/remote/Server.js"
import { root, spawnCli } from "./support/cli.js"

const base = (process.env.NNSIGHT_TEST_PG ?? "postgres://postgres@127.0.0.1:5432").replace(/\/+$/, "")
const dbName = `nnsight_test_${randomBytes(6).toString("hex")}`
const database = `${base}/${dbName}`
const LEASE_SECONDS = 3
const KEY = "cluster-test-key"
const OTHER = "cluster-other-key"
const prompt = "Once upon a time, there was a little girl named"

type Db = ManagedRuntime.ManagedRuntime<SqlClient.SqlClient, unknown>
let admin: Db | undefined
let db: Db | undefined
let created = false
let client: LanguageModel
let hosted: LanguageModel
let front: Server.Running | undefined
const runners: Array<{ readonly name: string; readonly child: ChildProcess; log: string }> = []

const query = <A>(rt: Db, f: (sql: SqlClient.SqlClient) => Effect.Effect<A, unknown>) =>
  rt.runPromise(Effect.gen(function*() {
    return yield* f(yield* SqlClient.SqlClient)
  }))

const freePort = () =>
  new Promise<number>((resolve, reject) => {
    const s = createServer()
    s.once("error", reject)
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })

const until = async (what: string, ok: () => Promise<boolean>, timeoutMs: number, everyMs = 50) => {
  const end = Date.now() + timeoutMs
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}\n${runners.map((r) => `--- runner ${r.name}\n${r.log}`).join("\n")}`)
    await new Promise((r) => setTimeout(r, everyMs))
  }
}

/** A runner process: the command line from source (`serve --database --role runner`). */
const spawnRunner = (port: number) => {
  const name = `127.0.0.1:${port}`
  const child = spawnCli(
    [
      "serve",
      "--database",
      database,
      "--role",
      "runner",
      "--model",
      path.join(root, "models/stories260K"),
      "--runner-address",
      name,
      "--lease-seconds",
      String(LEASE_SECONDS)
    ],
    { NNSIGHT_DATABASE_URL: "" }
  )
  const entry = { name, child, log: "" }
  child.stdout!.on("data", (d) => (entry.log += String(d)))
  child.stderr!.on("data", (d) => (entry.log += String(d)))
  runners.push(entry)
  return entry
}

beforeAll(async () => {
  // PostgreSQL must be there: a failure to connect fails the file
  admin = ManagedRuntime.make(PgClient.layer({ url: Redacted.make(`${base}/postgres`), maxConnections: 1 }))
  await query(admin, (sql) => sql.unsafe(`CREATE DATABASE ${dbName}`))
  created = true
  db = ManagedRuntime.make(PgClient.layer({ url: Redacted.make(database), maxConnections: 2 }))
  const ports = [await freePort(), await freePort()]
  for (const p of ports) spawnRunner(p)
  client = await LanguageModel.load("models/stories260K")
  hosted = await LanguageModel.load("models/stories260K")
  front = await Cluster.start({
    database,
    role: "front",
    models: [{ key: "stories260K", model: hosted }],
    keys: [{ id: "alice", key: KEY }, { id: "bob", key: OTHER }],
    port: 0,
    leaseMs: LEASE_SECONDS * 1000,
    coBatch: true
  })
  for (const r of runners) await until(`runner ${r.name} to start`, async () => r.log.includes(`nnsight-ts runner ${r.name}`), 45_000, 100)
  // both runners hold shards (PostgreSQL advisory locks of two sessions)
  await until("both runners to hold shards", async () => {
    const rows = await query(db!, (sql) =>
      sql<{ n: number }>`SELECT count(DISTINCT pid)::int AS n FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`)
    return rows[0].n >= 2
  }, 30_000, 100)
}, 90_000)

afterAll(async () => {
  for (const r of runners) if (r.child.exitCode === null && r.child.signalCode === null) r.child.kill("SIGKILL")
  await Promise.all(runners.map((r) => (r.child.exitCode !== null || r.child.signalCode !== null ? undefined : new Promise((res) => r.child.once("exit", res)))))
  await front?.close()
  await client?.close()
  await hosted?.close()
  await db?.dispose()
  if (admin !== undefined && created) await query(admin, (sql) => sql.unsafe(`DROP DATABASE IF EXISTS ${dbName} WITH (FORCE)`))
  await admin?.dispose()
}, 60_000)

const remote = () => ({ url: front!.url, apiKey: KEY })

interface JobRow {
  readonly id: string
  readonly state: string
  readonly attempts: number
  readonly runner: string | null
  readonly terminals: number
  readonly completions: number
}

const jobRows = () =>
  query(db!, (sql) =>
    sql<JobRow>`SELECT j.id, j.state, j.attempts, j.runner,
      (SELECT count(*)::int FROM nnsight_job_events e WHERE e.job_id = j.id AND e.event->>'_tag' IN ('Completed', 'Failed')) AS terminals,
      (SELECT count(*)::int FROM nnsight_job_events e WHERE e.job_id = j.id AND e.event->>'_tag' = 'Completed') AS completions
      FROM nnsight_jobs j ORDER BY j.submitted_at`)

describe("scale-out: two runners on PostgreSQL", () => {
  it("fault: a runner SIGKILLed while jobs run loses no job and duplicates none", async () => {
    const names = ["girl", "boy", "dog", "cat"]
    const prompts = names.map((n) => `Once upon a time, there was a little ${n} named`)
    const genOptions = { maxNewTokens: 160, useCache: false }
    const gen = (m: any) => m.generator.output
    const lens = (m: any) => ({ logits: m.lm_head.output.at(0, -1), h: m.model.layers[2].output })
    // what a local run gives
    const expectedTokens = await Promise.all(prompts.map((p) => client.generate(p, genOptions, gen).then((t: Tensor) => t.toNumbers())))
    const expectedTraces = await Promise.all(prompts.map((p) => client.trace(p, lens)))

    const t0 = Date.now()
    const settle = <A>(p: Promise<A>) => p.then((value) => ({ ok: true as const, value }), (error: unknown) => ({ ok: false as const, error }))
    const generations = Array.from({ length: 10 }, (_, i) => settle(client.generate(prompts[i % prompts.length], { ...genOptions, remote: remote() }, gen)))
    const traces = Array.from({ length: 6 }, (_, i) => settle(client.trace(prompts[i % prompts.length], lens, { remote: remote() })))
    const submitted = generations.length + traces.length

    // once both runners have started jobs, kill one while it runs one
    await until("jobs on both runners", async () => {
      const rows = await query(db!, (sql) => sql<{ n: number }>`SELECT count(DISTINCT runner)::int AS n FROM nnsight_runs`)
      return rows[0].n >= 2
    }, 30_000, 20)
    let victim: (typeof runners)[number] | undefined
    let runningThere: ReadonlyArray<string> = []
    // a generation that started just now (it runs for hundreds of milliseconds more)
    await until("a generation running on a runner", async () => {
      const rows = await query(db!, (sql) =>
        sql<{ id: string; runner: string }>`SELECT id, runner FROM nnsight_jobs
          WHERE state = 'running' AND kind = 'generate' AND started_at > ${Date.now() - 100}`)
      victim = runners.find((r) => rows.some((x) => x.runner === r.name))
      runningThere = rows.filter((x) => x.runner === victim?.name).map((x) => x.id)
      return victim !== undefined
    }, 30_000, 10)
    victim!.child.kill("SIGKILL")
    const killedAt = Date.now() - t0

    const gens = await Promise.all(generations)
    const trs = await Promise.all(traces)
    const elapsed = Date.now() - t0

    // every job ended: completed with the local values, or failed with a reported error
    let completed = 0
    gens.forEach((g, i) => {
      if (g.ok) {
        completed++
        expect((g.value as Tensor).toNumbers(), `generation ${i}`).toEqual(expectedTokens[i % prompts.length])
      } else expect(String(g.error), `generation ${i}`).toMatch(/\S/)
    })
    trs.forEach((t, i) => {
      if (t.ok) {
        completed++
        const want = expectedTraces[i % prompts.length]
        expect(t.value.logits.allClose(want.logits, 1e-6, 1e-6), `trace ${i} logits`).toBe(true)
        expect(t.value.h.allClose(want.h, 1e-6, 1e-6), `trace ${i} h`).toBe(true)
      } else expect(String(t.error), `trace ${i}`).toMatch(/\S/)
    })

    const rows = await jobRows()
    expect(rows.length, "every submitted job is in the database").toBe(submitted)
    for (const r of rows) {
      expect(["completed", "failed"], `job ${r.id} ended`).toContain(r.state)
      expect(r.terminals, `job ${r.id}: one terminal event`).toBe(1)
      expect(r.completions, `job ${r.id}: completed at most once`).toBeLessThanOrEqual(1)
      if (r.state === "failed") {
        const failed = await query(db!, (sql) => sql<{ error: unknown }>`SELECT error FROM nnsight_jobs WHERE id = ${r.id}`)
        expect(failed[0].error, `job ${r.id}: its error is reported`).toBeTruthy()
      }
    }
    expect(rows.filter((r) => r.state === "completed").length).toBe(completed)
    // one kill, three attempts allowed: everything completes, on the runner that survived
    expect(completed).toBe(submitted)
    // the jobs that were running on the killed runner started again elsewhere
    expect(runningThere.length).toBeGreaterThan(0)
    for (const id of runningThere) {
      const r = rows.find((x) => x.id === id)!
      expect(r.attempts, `job ${id} was retried`).toBeGreaterThanOrEqual(2)
      expect(r.runner).not.toBe(victim!.name)
    }
    const stats = await front!.stats()
    expect(stats.submitted).toBe(submitted)
    expect(stats.completed).toBe(submitted)
    console.log(`cluster fault test: ${submitted} jobs, runner ${victim!.name} killed at ${killedAt} ms with ${runningThere.length} running, all ended after ${elapsed} ms`)
  }, 90_000)

  it("job handles work through any front: status, events, result; other keys see nothing; a queued job cancels", async () => {
    const { graph } = client.record(prompt, (m: any) => ({ logits: m.lm_head.output }))
    const options = remote()
    const job = await Remote.submit(options, { kind: "trace", runtime: client.runtime, graph, prompts: [prompt] })
    expect(job.model).toBe("stories260K")
    const outcome = await job.result()
    const local = await client.trace(prompt, (m: any) => ({ logits: m.lm_head.output }))
    const id = (graph.result as { fields: Record<string, { id: number }> }).fields.logits.id
    expect((outcome.values.get(id) as Tensor).allClose(local.logits, 1e-6, 1e-6)).toBe(true)
    const status = await job.status()
    expect(status.state).toBe("completed")
    expect(status.finishedAt).toBeGreaterThanOrEqual(status.submittedAt)
    const events: Array<string> = []
    for await (const e of job.events()) events.push(e._tag)
    expect(events[0]).toBe("Received")
    expect(events).toContain("Running")
    expect(events[events.length - 1]).toBe("Completed")
    expect((await Remote.job(options, job.id).status()).state).toBe("completed")
    await expect(Remote.job({ url: front!.url, apiKey: OTHER }, job.id).status()).rejects.toBeInstanceOf(Protocol.JobNotFound)

    // a queued job cancels (a long generation keeps the survivor busy)
    const busy = client.generate(prompt, { maxNewTokens: 200, useCache: false, remote: options }, (m: any) => m.generator.output)
    const queued = await Remote.submit(options, { kind: "trace", runtime: client.runtime, graph, prompts: [prompt] })
    const cancelled = await queued.cancel()
    expect(["cancelled", "completed"]).toContain(cancelled.state)
    if (cancelled.state === "cancelled") await expect(queued.result()).rejects.toBeInstanceOf(Protocol.JobCancelled)
    await busy
    const rows = await jobRows()
    for (const r of rows) expect(r.terminals, `job ${r.id}: one terminal event`).toBe(1)
  }, 60_000)
})
