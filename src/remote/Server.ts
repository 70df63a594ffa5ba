/**
 * The nnsight-ts server: hosts models and runs users' intervention graphs
 * with the local interpreter, behind the typed HTTP API of `Protocol`.
 *
 * - **Models** are registered under keys ({@link Registry}); a model's
 *   fingerprint lets clients find the model they traced against.
 * - **API keys** are stored hashed (scrypt, or salted sha256), from a key
 *   file or the environment; each key has limits (concurrent jobs, graph
 *   nodes, saved bytes, tokens, wall time).
 * - **Admission** decodes every request strictly (the `Protocol` Schemas),
 *   checks the graph's structure, resolves every hook against the model
 *   (an unknown module is a typed 422 carrying the trace error a local run
 *   would raise), estimates saved bytes by scanning shapes, counts tokens;
 *   anything malformed, oversized, unauthorised or over a limit is a typed
 *   4xx and never reaches the queue.
 * - **The queue** ({@link JobQueue}) is a service: the in-memory one here
 *   runs one worker per model; the cluster-backed one of `Cluster`
 *   (effect/cluster, PostgreSQL) replaces it with the same interface,
 *   reusing {@link runGroup} ({@link layerWith}).
 * - **Co-batching**: concurrent trace jobs for the same model whose inputs
 *   have the same shapes (beyond the batch dimension) run as invokes of one
 *   forward pass: their graphs are merged (node ids and invoke indices
 *   renumbered) and their feeds concatenated. Only graphs whose every hook
 *   reads or writes a tensor whose first dimension is the batch (checked by
 *   symbolic shape inference), with no early stop, ad-hoc module calls,
 *   control flow or logging, qualify; a merged pass that fails reruns each
 *   job alone, so one user's error never touches another's job. Jobs that
 *   send the same one-invoke graph share one invoke when every operation
 *   of the graph keeps rows apart (`Stacking`): the graph's own operations
 *   then run once over all their rows. `coBatch: false` keeps every job on
 *   its own pass.
 *
 * @example
 * import * as Server from "nnsight-ts/remote/Server"
 * const server = await Server.start({
 *   models: [{ key: "stories260K", model }],
 *   keys: [{ id: "alice", key: process.env.ALICE_KEY! }],
 *   port: 8470
 * })
 * console.log(server.url)
 * await server.close()
 *
 * @since 0.1.0
 */
import { createHash, randomBytes, randomUUID, scrypt as scryptCb, timingSafeEqual } from "node:crypto"
import { createServer } from "node:http"
import { NodeHttpServer } from "@effect/platform-node"
import { Cause, Context, Effect, Exit, Latch, Layer, Queue, Redacted, Scope, Stream } from "effect"
import { HttpIncomingMessage, HttpRouter, HttpServer, HttpServerRequest } from "effect/http"
import { HttpApiBuilder } from "effect/http-api"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import { Tensor } from "../core/Tensor.js"
import * as Generate from "../backends/Generate.js"
import * as Local from "../backends/Local.js"
import * as Scan from "../backends/Scan.js"
import * as Session from "../backends/Session.js"
import type * as Values from "../backends/Values.js"
import { LanguageModel } from "../models/LanguageModel.js"
import type { TracedModel } from "../models/NNsight.js"
import * as Shapes from "../models/Shapes.js"
import * as Protocol from "./Protocol.js"
import * as Stacking from "./Stacking.js"

// ---------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------

/**
 * A stored API key: its id (who owns jobs), its hash, its limits.
 *
 * @since 0.1.0
 */
export interface KeyEntry {
  readonly id: string
  /** `scrypt$N$r$p$salt$hash` or `sha256$salt$hash` (hex), from {@link hashKey}. */
  readonly hash: string
  readonly limits?: Partial<Protocol.Limits>
}

/**
 * A key given in plain text (hashed in memory at start; for embedded servers and tests).
 *
 * @since 0.1.0
 */
export interface PlainKey {
  readonly id: string
  readonly key: string
  readonly limits?: Partial<Protocol.Limits>
}

/**
 * Default limits of a key.
 *
 * @since 0.1.0
 */
export const defaultLimits: Protocol.Limits = {
  concurrentJobs: 64,
  graphNodes: 20_000,
  savedBytes: 256 * 1024 * 1024,
  valueBytes: 1024 * 1024 * 1024,
  tokens: 1_000_000,
  wallTimeMs: 120_000
}

const scryptParams = { N: 16384, r: 8, p: 1 } as const

const scrypt = (key: string, salt: Buffer, n: number, r: number, p: number, length: number) =>
  new Promise<Buffer>((resolve, reject) =>
    scryptCb(key, salt, length, { N: n, r, p, maxmem: 256 * n * r }, (err, out) => (err ? reject(err) : resolve(out)))
  )

/**
 * A new random API key (`nns_` + 32 random bytes, base64url).
 *
 * @example
 * const key = Server.generateKey()
 *
 * @since 0.1.0
 */
export const generateKey = (): string => `nns_${randomBytes(32).toString("base64url")}`

/**
 * Hashes an API key for storage: scrypt with a random salt (default), or a
 * salted sha256 (fast; fine for random keys like {@link generateKey}'s).
 *
 * @example
 * const entry = { id: "alice", hash: await Server.hashKey(key) }
 *
 * @since 0.1.0
 */
export const hashKey = async (key: string, scheme: "scrypt" | "sha256" = "scrypt"): Promise<string> => {
  const salt = randomBytes(16)
  if (scheme === "sha256") return `sha256$${salt.toString("hex")}$${createHash("sha256").update(salt).update(key).digest("hex")}`
  const { N, r, p } = scryptParams
  const out = await scrypt(key, salt, N, r, p, 32)
  return `scrypt$${N}$${r}$${p}$${salt.toString("hex")}$${out.toString("hex")}`
}

/**
 * Whether a key matches a stored hash (constant-time comparison).
 *
 * @since 0.1.0
 */
export const verifyKey = async (key: string, stored: string): Promise<boolean> => {
  const parts = stored.split("$")
  const equal = (a: Buffer, b: Buffer) => a.length === b.length && timingSafeEqual(a, b)
  if (parts[0] === "sha256" && parts.length === 3) {
    const salt = Buffer.from(parts[1], "hex")
    return equal(createHash("sha256").update(salt).update(key).digest(), Buffer.from(parts[2], "hex"))
  }
  if (parts[0] === "scrypt" && parts.length === 6) {
    const [n, r, p] = parts.slice(1, 4).map(Number)
    if (![n, r, p].every((x) => Number.isSafeInteger(x) && x > 0) || n > 1 << 20) return false
    const want = Buffer.from(parts[5], "hex")
    const got = await scrypt(key, Buffer.from(parts[4], "hex"), n, r, p, want.length)
    return equal(got, want)
  }
  return false
}

/**
 * Reads keys from the environment: `NNSIGHT_API_KEYS="id:key,id2:key2"`
 * (plain keys) or `NNSIGHT_API_KEY_HASHES="id:hash,..."`.
 *
 * @since 0.1.0
 */
export const keysFromEnv = (env: NodeJS.ProcessEnv = process.env): ReadonlyArray<KeyEntry | PlainKey> => {
  const pairs = (s: string | undefined) =>
    (s ?? "")
      .split(",")
      .map((x) => x.trim())
      .filter((x) => x.length > 0)
      .map((x) => [x.slice(0, x.indexOf(":")), x.slice(x.indexOf(":") + 1)] as const)
      .filter(([id, v]) => id.length > 0 && v.length > 0)
  return [
    ...pairs(env.NNSIGHT_API_KEYS).map(([id, key]) => ({ id, key })),
    ...pairs(env.NNSIGHT_API_KEY_HASHES).map(([id, hash]) => ({ id, hash }))
  ]
}

/**
 * Authenticates bearer tokens against the stored key hashes. A token that
 * verified once is remembered by its sha256, so scrypt runs once per key.
 *
 * @since 0.1.0
 */
export interface KeysService {
  readonly authenticate: (token: string) => Effect.Effect<{ readonly id: string; readonly limits: Protocol.Limits }, Protocol.Unauthorized>
}

/**
 * Authenticates bearer tokens against the stored key hashes. A token that
 * verified once is remembered by its sha256, so scrypt runs once per key.
 *
 * @since 0.1.0
 */
export class Keys extends Context.Service<Keys, KeysService>()("nnsight-ts/remote/Keys") {}

/**
 * Keys from entries (hashed) and plain keys (hashed here).
 *
 * @since 0.1.0
 */
export const makeKeys = (
  keys: ReadonlyArray<KeyEntry | PlainKey>,
  limits: Partial<Protocol.Limits> = {}
): Effect.Effect<KeysService> =>
  Effect.promise(async () => {
    const entries: Array<KeyEntry> = []
    for (const k of keys) {
      entries.push("key" in k ? { id: k.id, hash: await hashKey(k.key, "sha256"), limits: k.limits } : k)
    }
    const verified = new Map<string, KeyEntry>()
    const limitsOf = (e: KeyEntry): Protocol.Limits => ({ ...defaultLimits, ...limits, ...e.limits })
    const authenticate = (token: string) =>
      Effect.gen(function*() {
        if (token.length === 0) return yield* new Protocol.Unauthorized({ reason: "no API key: send Authorization: Bearer <key>" })
        if (token.length > 512) return yield* new Protocol.Unauthorized({ reason: "invalid API key" })
        const digest = createHash("sha256").update(token).digest("hex")
        const hit = verified.get(digest)
        if (hit !== undefined) return { id: hit.id, limits: limitsOf(hit) }
        for (const e of entries) {
          if (yield* Effect.promise(() => verifyKey(token, e.hash).catch(() => false))) {
            verified.set(digest, e)
            return { id: e.id, limits: limitsOf(e) }
          }
        }
        return yield* new Protocol.Unauthorized({ reason: "invalid API key" })
      })
    return { authenticate }
  })

// ---------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------

/**
 * A model the server hosts.
 *
 * @since 0.1.0
 */
export interface Hosted {
  readonly key: string
  readonly model: TracedModel<any>
  readonly runtime: Local.Runtime
  /** Set for language models: prompts can be tokenized on the server. */
  readonly language: LanguageModel | undefined
  readonly info: Protocol.ModelInfo
}

/**
 * Makes a hosted model entry.
 *
 * @since 0.1.0
 */
export const host = (key: string, model: TracedModel<any>): Hosted => {
  const language = model instanceof LanguageModel ? model : undefined
  return {
    key,
    model,
    runtime: model.runtime,
    language,
    info: {
      key,
      fingerprint: Protocol.fingerprint(model.runtime.loaded),
      kind: language === undefined ? "generic" : "language",
      inputs: model.runtime.loaded.model.graph.inputs.map((v) => v.name)
    }
  }
}

/**
 * The hosted models.
 *
 * @since 0.1.0
 */
export class Registry extends Context.Service<
  Registry,
  { readonly get: (key: string) => Hosted | undefined; readonly list: ReadonlyArray<Hosted> }
>()("nnsight-ts/remote/Registry") {
  /**
   * A registry of models.
   *
   * @since 0.1.0
   */
  static readonly layer = (models: ReadonlyArray<{ readonly key: string; readonly model: TracedModel<any> }>) =>
    Layer.sync(Registry, () => {
      const list = models.map((m) => host(m.key, m.model))
      const byKey = new Map(list.map((h) => [h.key, h]))
      return { get: (key: string) => byKey.get(key), list }
    })
}

// ---------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------

/**
 * An admitted job, ready to queue.
 *
 * @since 0.1.0
 */
export interface JobSpec {
  readonly owner: string
  readonly limits: Protocol.Limits
  readonly model: string
  readonly kind: Protocol.JobKind
  readonly graph: Graph.Graph
  readonly feeds: Readonly<Record<string, Tensor>>
  readonly rows: ReadonlyArray<Local.Rows>
  readonly generate: Protocol.GenerateOptions | undefined
  /** Jobs with equal keys may share one forward pass; unset: the job runs alone. */
  readonly coBatchKey: string | undefined
}

/**
 * What the queue does. The in-memory implementation ({@link JobQueue.layerMemory})
 * runs jobs in this process; a cluster-backed one can replace it.
 *
 * @since 0.1.0
 */
export interface JobQueueService {
  readonly submit: (spec: JobSpec) => Effect.Effect<Protocol.JobStatus, Protocol.TooManyJobs>
  readonly status: (owner: string, id: string) => Effect.Effect<Protocol.JobStatus, Protocol.JobNotFound>
  readonly events: (owner: string, id: string) => Effect.Effect<Stream.Stream<Protocol.JobEvent>, Protocol.JobNotFound>
  /** Waits until the job ends; gives its log lines. */
  readonly ended: (owner: string, id: string) => Effect.Effect<ReadonlyArray<string>, Protocol.JobNotFound>
  readonly result: (
    owner: string,
    id: string
  ) => Effect.Effect<Protocol.JobResult, Protocol.JobNotFound | Protocol.NotReady | Protocol.JobFailed>
  readonly cancel: (owner: string, id: string) => Effect.Effect<Protocol.JobStatus, Protocol.JobNotFound>
  readonly stats: Effect.Effect<Protocol.Stats>
  /** Counts a request refused at admission. */
  readonly rejected: Effect.Effect<void>
}

/**
 * `JobQueueService.ended` for a queue that has only its events: the log
 * lines of the stream up to its terminal event.
 *
 * @example
 * ended: (owner, id) => Effect.flatMap(events(owner, id), Server.logsUntilEnd)
 *
 * @since 0.1.0
 */
export const logsUntilEnd = (events: Stream.Stream<Protocol.JobEvent>): Effect.Effect<ReadonlyArray<string>> =>
  Effect.suspend(() => {
    const logs: Array<string> = []
    return Stream.runForEach(Stream.takeUntil(events, Protocol.isTerminal), (e) =>
      Effect.sync(() => {
        if (e._tag === "Log") logs.push(e.message)
      })).pipe(Effect.as(logs))
  })

/**
 * Options of co-batching.
 *
 * @since 0.1.0
 */
export interface CoBatchOptions {
  readonly enabled: boolean
  /** Most batch rows in one merged pass (default 16). */
  readonly maxRows?: number
  /** Most jobs in one merged pass (default 16). */
  readonly maxJobs?: number
}

interface JobRecord {
  readonly id: string
  readonly spec: JobSpec
  state: Protocol.JobState
  readonly submittedAt: number
  startedAt?: number
  finishedAt?: number
  position?: number
  /** When its position was last reported. */
  reportedAt: number
  batchedWith?: number
  error?: Protocol.JobError
  result?: Protocol.JobResult
  readonly events: Array<Protocol.JobEvent>
  readonly listeners: Set<(e: Protocol.JobEvent) => void>
}

/**
 * What a run gives each job of a group.
 *
 * @since 0.1.0
 */
export type JobOutcome =
  | { readonly _tag: "Done"; readonly result: Protocol.JobResult }
  | { readonly _tag: "Failed"; readonly error: Protocol.JobError }

/**
 * Hooks a run reports through.
 *
 * @since 0.1.0
 */
export interface RunHooks {
  /** A job's log line or generated token. */
  readonly event: (job: number, event: Protocol.JobEvent) => void
}

const batchOf = (rows: ReadonlyArray<Local.Rows>) => rows.reduce((a, r) => a + r.count, 0)

/**
 * The next group of a worker's queue, taken out of `pending`: the head job,
 * and queued jobs that can share its forward pass (the same co-batch key,
 * at most `maxJobs` jobs and `maxRows` rows in all).
 *
 * @example
 * const group = Server.takeGroup(pending, { enabled: true, maxJobs: 16, maxRows: 16 })
 *
 * @since 0.1.0
 */
export const takeGroup = <J extends { readonly spec: JobSpec }>(
  pending: Array<J>,
  options: { readonly enabled: boolean; readonly maxJobs: number; readonly maxRows: number }
): Array<J> => {
  const head = pending.shift()!
  const group = [head]
  const key = head.spec.coBatchKey
  if (!options.enabled || key === undefined) return group
  let rows = batchOf(head.spec.rows)
  for (let k = 0; k < pending.length && group.length < options.maxJobs;) {
    const j = pending[k]
    const r = batchOf(j.spec.rows)
    if (j.spec.coBatchKey === key && rows + r <= options.maxRows) {
      group.push(j)
      rows += r
      pending.splice(k, 1)
    } else k++
  }
  return group
}

/**
 * A model worker's queue: the jobs waiting, and a latch opened when one arrives.
 *
 * @since 0.1.0
 */
export interface WorkQueue<J> {
  readonly pending: Array<J>
  readonly latch: Latch.Latch
}

/**
 * Waits until a job is queued, then takes the next group ({@link takeGroup}).
 * A job that can share its pass first lets the event loop turn while that
 * brings more jobs: requests that reached the server together are admitted
 * over a few turns, and a pass started at the first of them would run it
 * nearly alone.
 *
 * @example
 * const group = yield* Server.nextGroup(queue, { enabled: true, maxJobs: 16, maxRows: 16 })
 *
 * @since 0.1.0
 */
export const nextGroup = <J extends { readonly spec: JobSpec }>(
  q: WorkQueue<J>,
  options: { readonly enabled: boolean; readonly maxJobs: number; readonly maxRows: number }
): Effect.Effect<Array<J>> =>
  Effect.gen(function*() {
    while (q.pending.length === 0) {
      q.latch.closeUnsafe()
      yield* q.latch.await
    }
    if (options.enabled && q.pending[0].spec.coBatchKey !== undefined) {
      for (let seen = -1, turns = 0; q.pending.length !== seen && q.pending.length < options.maxJobs && turns < 16; turns++) {
        seen = q.pending.length
        yield* nextTurn
      }
    }
    return takeGroup(q.pending, options)
  })

/** One turn of the event loop (after the I/O it has ready). */
const nextTurn = Effect.callback<void>((resume) => {
  const t = setImmediate(() => resume(Effect.void))
  return Effect.sync(() => clearImmediate(t))
})

/**
 * `f`, computed once per object. A request text seen again decodes to the
 * same graph (Protocol's cache), and admission, the queue and stacking each
 * ask about every job's graph and feeds.
 */
const perObject = <K extends object, A>(f: (k: K) => A): ((k: K) => A) => {
  const memo = new WeakMap<K, A>()
  return (k) => {
    if (memo.has(k)) return memo.get(k)!
    const a = f(k)
    memo.set(k, a)
    return a
  }
}

const allNodes = perObject((graph: Graph.Graph): ReadonlyArray<Graph.Node> => Graph.flatten(graph.nodes))

const formatLog = (args: ReadonlyArray<unknown>): string =>
  args
    .map((a) => {
      if (a instanceof Tensor) return a.toString()
      if (typeof a === "string") return a
      try {
        return JSON.stringify(a, (_, v) => (v instanceof Tensor ? v.toString() : typeof v === "bigint" ? Number(v) : v))
      } catch {
        return String(a)
      }
    })
    .join(" ")

/** The local interpreter on one graph, with `Log` nodes reported as events. */
const runTrace = (
  rt: Local.Runtime,
  graph: Graph.Graph,
  feeds: Readonly<Record<string, Tensor>>,
  rows: ReadonlyArray<Local.Rows>,
  log: (line: string) => void
): Effect.Effect<Local.Outcome, Errors.TraceError> =>
  allNodes(graph).some((n) => n._tag === "Log")
    ? Effect.gen(function*() {
      const run = yield* Local.start(rt, graph, rows, { log: (...args) => log(formatLog(args)) })
      yield* run.forward(feeds, 0)
      return yield* run.finish
    })
    : Local.execute(rt, { graph, feeds, rows })

const toResult = (outcome: Local.Outcome, tokens?: Tensor): Protocol.JobResult => ({
  values: [...outcome.values].map(([id, value]) => ({ id, value })),
  unavailable: [...outcome.unavailable].map(([id, error]) => ({ id, error })),
  ...(tokens === undefined ? {} : { tokens })
})

/**
 * The job error a failed run's cause reports: its trace error or limit,
 * else an internal error.
 *
 * @since 0.1.0
 */
export const defectError = (cause: Cause.Cause<unknown>): Protocol.JobError => {
  const e = Cause.squash(cause)
  if (Errors.isTraceError(e)) return e
  if (e instanceof Protocol.LimitExceeded) return e
  return new Protocol.InternalError({ reason: e instanceof Error ? e.message : String(e) })
}

/** A session on the server: its traces' inputs batched by the hosted model, as the client's would be. */
const runSession = (hosted: Hosted, graph: Graph.Graph, log: (line: string) => void) =>
  Session.execute(hosted.runtime, graph, {
    prepare: (inputs) => (hosted.model as unknown as { prepare: Session.Options["prepare"] })["prepare"].call(hosted.model, inputs),
    log: (...args) => log(formatLog(args))
  })

/** One job on its own pass. */
const runOne = (hosted: Hosted, spec: JobSpec, report: (e: Protocol.JobEvent) => void): Effect.Effect<JobOutcome> => {
  const work: Effect.Effect<Protocol.JobResult, Errors.TraceError> =
    spec.kind === "session"
      ? runSession(hosted, spec.graph, (message) => report({ _tag: "Log", message })).pipe(Effect.map((o) => toResult(o)))
      : spec.kind === "generate"
      ? Generate.run(hosted.runtime, { graph: spec.graph, feeds: spec.feeds, rows: spec.rows }, {
        ...(hosted.language === undefined ? {} : { eosTokenId: hosted.language.eosTokenIds, padTokenId: hosted.language.padTokenId }),
        ...stripUndefined(spec.generate ?? { maxNewTokens: 1 }),
        onToken: (t) => report({ _tag: "Token", step: t.step, tokens: [...t.tokens], finished: [...t.finished] })
      }).pipe(Effect.map(({ outcome, tokens }) => toResult(outcome, tokens)))
      : runTrace(hosted.runtime, spec.graph, spec.feeds, spec.rows, (message) => report({ _tag: "Log", message })).pipe(
        Effect.map((o) => toResult(o))
      )
  return withLimits(work, spec.limits).pipe(
    Effect.exit,
    Effect.map((exit): JobOutcome => {
      if (Exit.isSuccess(exit)) {
        const bytes = Protocol.resultBytes(exit.value)
        if (bytes > spec.limits.savedBytes) {
          return { _tag: "Failed", error: new Protocol.LimitExceeded({ limit: "savedBytes", value: bytes, max: spec.limits.savedBytes }) }
        }
        return { _tag: "Done", result: exit.value }
      }
      return { _tag: "Failed", error: defectError(exit.cause) }
    })
  )
}

const stripUndefined = <T extends object>(o: T): T =>
  Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as T

const withLimits = <A, E>(work: Effect.Effect<A, E>, limits: Protocol.Limits): Effect.Effect<A, E | Protocol.LimitExceeded> =>
  work.pipe(
    Effect.timeoutOrElse({
      duration: limits.wallTimeMs,
      orElse: () => Effect.fail(new Protocol.LimitExceeded({ limit: "wallTimeMs", value: limits.wallTimeMs, max: limits.wallTimeMs }))
    })
  )

// -- merging graphs ---------------------------------------------------------

const mergeable = new Set(["Hook", "Constant", "Scalar", "Op", "Set", "Param"])

const remapResult = (r: Graph.Result, off: number): Graph.Result => {
  switch (r._tag) {
    case "Ref":
      return { _tag: "Ref", id: r.id + off }
    case "Record":
      return { _tag: "Record", fields: Object.fromEntries(Object.entries(r.fields).map(([k, v]) => [k, remapResult(v, off)])) }
    case "List":
    case "Steps":
      return { _tag: r._tag, items: r.items.map((x) => remapResult(x, off)) }
    case "Value":
      return r
  }
}

const remapNode = (n: Graph.Node, off: number, inv: number): Graph.Node => {
  switch (n._tag) {
    case "Hook":
      return { ...n, id: n.id + off, ref: { ...n.ref, invoke: n.ref.invoke + inv } }
    case "Set":
      return { ...n, id: n.id + off, value: n.value + off, ref: { ...n.ref, invoke: n.ref.invoke + inv } }
    case "Op":
      return { ...n, id: n.id + off, args: n.args.map((a) => a + off) }
    case "Constant":
    case "Scalar":
    case "Param":
      return { ...n, id: n.id + off }
    default:
      throw new Error(`internal: cannot merge a ${n._tag} node`)
  }
}

/**
 * Merges trace jobs into one: each job's node ids are shifted past the
 * previous jobs', its invokes renumbered after theirs, its rows moved after
 * theirs. `feeds` are the batches to concatenate along the batch dimension,
 * in row order (one per job; a stack of jobs brings one per member).
 *
 * @since 0.1.0
 */
export const merge = (
  specs: ReadonlyArray<Pick<JobSpec, "graph" | "rows">>,
  feeds: ReadonlyArray<Readonly<Record<string, Tensor>>>
) => {
  const nodes: Array<Graph.Node> = []
  const results: Array<Graph.Result> = []
  const rows: Array<Local.Rows> = []
  const ranges: Array<{ readonly offset: number; readonly size: number }> = []
  let offset = 0
  let invokes = 0
  let rowOffset = 0
  for (const s of specs) {
    const size = s.graph.nodes.reduce((m, n) => Math.max(m, n.id + 1), 0)
    for (const n of s.graph.nodes) nodes.push(remapNode(n, offset, invokes))
    results.push(remapResult(s.graph.result, offset))
    for (const r of s.rows) rows.push({ start: r.start + rowOffset, count: r.count })
    ranges.push({ offset, size })
    offset += size
    invokes += s.graph.invokes
    rowOffset += batchOf(s.rows)
  }
  const batch: Record<string, Tensor> = {}
  for (const name of Object.keys(feeds[0])) batch[name] = concat0(feeds.map((f) => f[name]))
  const graph: Graph.Graph = { nodes, invokes, result: { _tag: "List", items: results } }
  return { graph, feeds: batch, rows, ranges }
}

const concat0 = (parts: ReadonlyArray<Tensor>): Tensor => {
  const [first] = parts
  if (parts.length === 1) return first
  const total = parts.reduce((a, p) => a + p.shape[0], 0)
  if (first.dtype === "string") {
    return new Tensor("string", [total, ...first.shape.slice(1)], parts.flatMap((p) => [...(p.data as ReadonlyArray<string>)]))
  }
  const rowBytes = parts.reduce((a, p) => a + (p.data as ArrayBufferView).byteLength, 0)
  // an empty past (a first step's KV cache) is the same empty tensor, whatever its batch
  if (rowBytes === 0) return new Tensor(first.dtype, [total, ...first.shape.slice(1)], first.data as never)
  const out = new Uint8Array(rowBytes)
  let at = 0
  for (const p of parts) {
    const d = p.data as ArrayBufferView
    out.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), at)
    at += d.byteLength
  }
  const Ctor = (first.data as unknown as { constructor: new(b: ArrayBuffer) => never }).constructor
  return new Tensor(first.dtype, [total, ...first.shape.slice(1)], new Ctor(out.buffer) as never)
}

/**
 * Co-batched jobs of one graph, stacked into one invoke over all their rows
 * where the graph keeps rows apart (see {@link Stacking}); every other job
 * on its own.
 */
interface Stack {
  readonly graph: Graph.Graph
  readonly rows: ReadonlyArray<Local.Rows>
  /** The jobs (indices into the group) it runs, in the order of its rows. */
  readonly jobs: ReadonlyArray<number>
  /** Set when it stacks several jobs: the values that hold rows, and each job's rows. */
  readonly stacked?: { readonly rows: ReadonlySet<number>; readonly members: ReadonlyArray<Stacking.Member> }
}

/** The values of a one-invoke trace job's graph that hold its rows, and the key of the jobs it can stack with; unset: it cannot stack. */
const stackRows = (hosted: Hosted, s: JobSpec): { readonly key: string; readonly rows: ReadonlySet<number> } | undefined => {
  if (s.kind !== "trace" || s.graph.invokes !== 1 || s.rows.length !== 1) return undefined
  const key = `${graphHash(s.graph)}|${feedsKey(s.feeds, 1)}`
  let rows = stackable.get(hosted, key)
  if (rows === undefined) {
    try {
      const batch = batchOf(s.rows)
      const scanned = batchedHooks(hosted, s.feeds, s.graph, batch)
        ? Scan.run(hosted.runtime.loaded, { graph: s.graph, inputs: s.feeds, rows: s.rows })
        : undefined
      rows = (scanned && Stacking.rowwise(s.graph, scanned.values, scanned.hooks)) ?? null
    } catch {
      rows = null
    }
    stackable.set(hosted, key, rows)
  }
  return rows === null ? undefined : { key, rows }
}

const stacks = (hosted: Hosted, specs: ReadonlyArray<JobSpec>): ReadonlyArray<Stack> => {
  const order: Array<{ readonly jobs: Array<number>; readonly rows?: ReadonlySet<number> }> = []
  const byKey = new Map<string, (typeof order)[number]>()
  specs.forEach((s, k) => {
    const st = stackRows(hosted, s)
    const known = st === undefined ? undefined : byKey.get(st.key)
    if (known !== undefined) return known.jobs.push(k)
    const entry = { jobs: [k], rows: st?.rows }
    order.push(entry)
    if (st !== undefined) byKey.set(st.key, entry)
  })
  return order.map(({ jobs, rows }): Stack => {
    const [head] = jobs
    if (jobs.length === 1 || rows === undefined) return { graph: specs[head].graph, rows: specs[head].rows, jobs }
    const members = Stacking.members(jobs.map((k) => batchOf(specs[k].rows)))
    const total = members.reduce((a, m) => a + m.count, 0)
    return { graph: specs[head].graph, rows: [{ start: 0, count: total }], jobs, stacked: { rows, members } }
  })
}

/**
 * Runs a group of jobs of one model: one job on its own pass; several
 * co-batchable trace jobs on one merged pass, split back per job (and, if
 * the merged pass fails, each job again on its own, so errors stay with
 * the job that caused them). Jobs of one graph that keeps rows apart share
 * one invoke in the merged pass.
 *
 * @since 0.1.0
 */
export const runGroup = (
  hosted: Hosted,
  specs: ReadonlyArray<JobSpec>,
  hooks: RunHooks
): Effect.Effect<ReadonlyArray<JobOutcome>> =>
  Effect.gen(function*() {
    const alone = Effect.forEach(specs, (s, k) => runOne(hosted, s, (e) => hooks.event(k, e)))
    if (specs.length === 1) return yield* alone
    const merged = yield* Effect.sync(() => {
      const parts = stacks(hosted, specs)
      // a stack's rows are its jobs' rows, one after another
      return { parts, ...merge(parts, parts.flatMap((p) => p.jobs.map((k) => specs[k].feeds))) }
    }).pipe(Effect.exit)
    if (Exit.isFailure(merged)) return yield* alone
    const { parts, graph, feeds, rows, ranges } = merged.value
    const limits: Protocol.Limits = {
      ...specs[0].limits,
      wallTimeMs: Math.min(...specs.map((s) => s.limits.wallTimeMs))
    }
    const exit = yield* withLimits(
      runTrace(hosted.runtime, graph, feeds, rows, () => {}),
      limits
    ).pipe(Effect.exit)
    if (Exit.isFailure(exit)) return yield* alone
    const outcome = exit.value
    const outcomes = new Array<JobOutcome>(specs.length)
    parts.forEach((part, g) => {
      const { offset, size } = ranges[g]
      const values = new Map<number, Values.Val>()
      const unavailable = new Map<number, Errors.Unavailable>()
      for (const [id, v] of outcome.values) if (id >= offset && id < offset + size) values.set(id - offset, v)
      for (const [id, e] of outcome.unavailable) if (id >= offset && id < offset + size) unavailable.set(id - offset, e)
      const own = { values, unavailable }
      part.jobs.forEach((k, m) => {
        const result = toResult(part.stacked === undefined ? own : Stacking.split(own, part.stacked.rows, part.stacked.members[m]))
        const bytes = Protocol.resultBytes(result)
        outcomes[k] = bytes > specs[k].limits.savedBytes
          ? { _tag: "Failed", error: new Protocol.LimitExceeded({ limit: "savedBytes", value: bytes, max: specs[k].limits.savedBytes }) }
          : { _tag: "Done", result }
      })
    })
    return outcomes
  })

/**
 * The job queue.
 *
 * @since 0.1.0
 */
export class JobQueue extends Context.Service<JobQueue, JobQueueService>()("nnsight-ts/remote/JobQueue") {
  /**
   * The in-memory queue: one worker per model, jobs in arrival order,
   * compatible trace jobs co-batched; finished jobs are kept for
   * `resultTtlMs` (default 10 minutes), at most `maxRetainedJobs` per key
   * (default 1024, oldest dropped first).
   *
   * @since 0.1.0
   */
  static readonly layerMemory = (
    options: { readonly coBatch?: CoBatchOptions; readonly resultTtlMs?: number; readonly maxRetainedJobs?: number } = {}
  ) =>
    Layer.effect(
      JobQueue,
      Effect.gen(function*() {
        const registry = yield* Registry
        const coBatch = options.coBatch ?? { enabled: true }
        const maxRows = coBatch.maxRows ?? 16
        const maxJobs = coBatch.maxJobs ?? 16
        const ttl = options.resultTtlMs ?? 10 * 60_000
        const maxRetained = options.maxRetainedJobs ?? 1024
        const jobs = new Map<string, JobRecord>()
        const active = new Map<string, number>()
        const queues = new Map<string, WorkQueue<JobRecord>>()
        const stats = {
          submitted: 0,
          completed: 0,
          failed: 0,
          rejected: 0,
          runs: 0,
          coBatchedRuns: 0,
          coBatchedJobs: 0,
          largestBatch: 0,
          running: 0
        }
        let lastSweep = 0

        const emit = (job: JobRecord, e: Protocol.JobEvent) => {
          job.events.push(e)
          for (const l of job.listeners) l(e)
        }
        const statusOf = (j: JobRecord): Protocol.JobStatus => ({
          id: j.id,
          model: j.spec.model,
          kind: j.spec.kind,
          state: j.state,
          submittedAt: j.submittedAt,
          ...(j.position === undefined ? {} : { position: j.position }),
          ...(j.batchedWith === undefined ? {} : { batchedWith: j.batchedWith }),
          ...(j.error === undefined ? {} : { error: j.error }),
          ...(j.startedAt === undefined ? {} : { startedAt: j.startedAt }),
          ...(j.finishedAt === undefined ? {} : { finishedAt: j.finishedAt })
        })
        const find = (owner: string, id: string) => {
          const j = jobs.get(id)
          // another key's job does not exist for this key
          return j === undefined || j.spec.owner !== owner ? Effect.fail(new Protocol.JobNotFound({ id })) : Effect.succeed(j)
        }
        const retained = new Map<string, Array<string>>()
        const retain = (j: JobRecord) => {
          let ids = retained.get(j.spec.owner)
          if (ids === undefined) retained.set(j.spec.owner, (ids = []))
          ids.push(j.id)
          // the oldest finished jobs of a key go first
          while (ids.length > maxRetained) jobs.delete(ids.shift()!)
        }
        const finish = (j: JobRecord, outcome: JobOutcome | { readonly _tag: "Cancelled" }) => {
          j.finishedAt = Date.now()
          retain(j)
          j.position = undefined
          active.set(j.spec.owner, (active.get(j.spec.owner) ?? 1) - 1)
          if (outcome._tag === "Done") {
            j.state = "completed"
            j.result = outcome.result
            stats.completed++
            emit(j, { _tag: "Completed", elapsedMs: j.finishedAt - (j.startedAt ?? j.submittedAt), resultBytes: Protocol.resultBytes(outcome.result) })
          } else {
            const error = outcome._tag === "Cancelled" ? new Protocol.JobCancelled({ id: j.id }) : outcome.error
            j.state = outcome._tag === "Cancelled" ? "cancelled" : "failed"
            j.error = error
            stats.failed++
            emit(j, { _tag: "Failed", error })
          }
        }
        const sweep = () => {
          const now = Date.now()
          if (now - lastSweep < 1000) return
          lastSweep = now
          for (const [id, j] of jobs) if (j.finishedAt !== undefined && now - j.finishedAt > ttl) jobs.delete(id)
          for (const [owner, ids] of retained) {
            const kept = ids.filter((id) => jobs.has(id))
            if (kept.length === 0) retained.delete(owner)
            else retained.set(owner, kept)
          }
        }
        // positions change on every dequeue: report the near ones at once, the rest at most 4 times a second
        const updatePositions = (q: { readonly pending: Array<JobRecord> }) => {
          const now = Date.now()
          q.pending.forEach((j, k) => {
            if (j.position === k) return
            j.position = k
            if (k < 4 || now - j.reportedAt >= 250) {
              j.reportedAt = now
              emit(j, { _tag: "Queued", position: k })
            }
          })
        }

        const worker = (hosted: Hosted, q: WorkQueue<JobRecord>) =>
          Effect.gen(function*() {
            while (true) {
              const group = yield* nextGroup(q, { enabled: coBatch.enabled, maxJobs, maxRows })
              const now = Date.now()
              for (const j of group) {
                j.state = "running"
                j.startedAt = now
                j.position = undefined
                j.batchedWith = group.length
                emit(j, { _tag: "Running", batchedWith: group.length })
              }
              updatePositions(q)
              stats.runs++
              stats.running += group.length
              stats.largestBatch = Math.max(stats.largestBatch, group.length)
              if (group.length > 1) {
                stats.coBatchedRuns++
                stats.coBatchedJobs += group.length
              }
              const outcomes = yield* runGroup(hosted, group.map((j) => j.spec), { event: (k, e) => emit(group[k], e) }).pipe(
                Effect.catchCause((cause) => Effect.succeed(group.map((): JobOutcome => ({ _tag: "Failed", error: defectError(cause) }))))
              )
              stats.running -= group.length
              group.forEach((j, k) => finish(j, j.state === "cancelled" ? { _tag: "Cancelled" } : outcomes[k]))
              yield* Effect.yieldNow
            }
          })

        // on shutdown, every unfinished job ends (so its event streams end too)
        yield* Effect.addFinalizer(() =>
          Effect.sync(() => {
            for (const j of jobs.values()) {
              if (j.finishedAt === undefined) finish(j, { _tag: "Failed", error: new Protocol.InternalError({ reason: "the server is shutting down" }) })
            }
            for (const q of queues.values()) q.pending.length = 0
          })
        )
        for (const hosted of registry.list) {
          const q = { pending: new Array<JobRecord>(), latch: Latch.makeUnsafe(false) }
          queues.set(hosted.key, q)
          yield* Effect.forkScoped(worker(hosted, q))
        }

        const service: JobQueueService = {
          submit: (spec) =>
            Effect.suspend(() => {
              sweep()
              const q = queues.get(spec.model)
              if (q === undefined) return Effect.die(new Error(`internal: no queue for model ${spec.model}`))
              const n = active.get(spec.owner) ?? 0
              if (n >= spec.limits.concurrentJobs) {
                stats.rejected++
                return Effect.fail(new Protocol.TooManyJobs({ active: n, max: spec.limits.concurrentJobs }))
              }
              active.set(spec.owner, n + 1)
              const job: JobRecord = {
                id: randomUUID(),
                spec,
                state: "queued",
                submittedAt: Date.now(),
                position: q.pending.length,
                reportedAt: Date.now(),
                events: [],
                listeners: new Set()
              }
              jobs.set(job.id, job)
              stats.submitted++
              emit(job, { _tag: "Received", id: job.id, model: spec.model })
              emit(job, { _tag: "Queued", position: q.pending.length })
              q.pending.push(job)
              q.latch.openUnsafe()
              return Effect.succeed(statusOf(job))
            }),
          status: (owner, id) => Effect.map(find(owner, id), statusOf),
          events: (owner, id) =>
            Effect.map(find(owner, id), (job) =>
              Stream.callback<Protocol.JobEvent>((queue) =>
                Effect.gen(function*() {
                  for (const e of job.events) Queue.offerUnsafe(queue, e)
                  if (job.events.some(Protocol.isTerminal)) {
                    Queue.endUnsafe(queue)
                    return
                  }
                  const listener = (e: Protocol.JobEvent) => {
                    Queue.offerUnsafe(queue, e)
                    if (Protocol.isTerminal(e)) Queue.endUnsafe(queue)
                  }
                  job.listeners.add(listener)
                  yield* Effect.addFinalizer(() => Effect.sync(() => job.listeners.delete(listener)))
                })
              )),
          // what `events` says, without a stream: the run endpoint waits on every job this way
          ended: (owner, id) =>
            Effect.flatMap(find(owner, id), (job) =>
              Effect.callback<ReadonlyArray<string>>((resume) => {
                const logs = () => job.events.flatMap((e) => (e._tag === "Log" ? [e.message] : []))
                if (job.events.some(Protocol.isTerminal)) return resume(Effect.succeed(logs()))
                const listener = (e: Protocol.JobEvent) => {
                  if (!Protocol.isTerminal(e)) return
                  job.listeners.delete(listener)
                  resume(Effect.succeed(logs()))
                }
                job.listeners.add(listener)
                return Effect.sync(() => job.listeners.delete(listener))
              })),
          result: (owner, id) =>
            Effect.flatMap(find(owner, id), (j): Effect.Effect<Protocol.JobResult, Protocol.NotReady | Protocol.JobFailed> => {
              if (j.state === "completed" && j.result !== undefined) return Effect.succeed(j.result)
              if (j.error !== undefined) return Effect.fail(new Protocol.JobFailed({ id, error: j.error }))
              return Effect.fail(new Protocol.NotReady({ id, state: j.state }))
            }),
          cancel: (owner, id) =>
            Effect.map(find(owner, id), (j) => {
              if (j.state === "queued") {
                const q = queues.get(j.spec.model)!
                const k = q.pending.indexOf(j)
                if (k >= 0) q.pending.splice(k, 1)
                finish(j, { _tag: "Cancelled" })
                updatePositions(q)
              } else if (j.state === "running") {
                // a running pass may be shared with other jobs: let it end, drop this job's result
                j.state = "cancelled"
              }
              return statusOf(j)
            }),
          stats: Effect.sync(() => ({
            ...stats,
            queued: [...queues.values()].reduce((a, q) => a + q.pending.length, 0)
          })),
          rejected: Effect.sync(() => {
            stats.rejected++
          })
        }
        return service
      })
    )
}

// ---------------------------------------------------------------------------
// Admission
// ---------------------------------------------------------------------------

const bad = (reason: string, issues: ReadonlyArray<string> = []) => new Protocol.BadRequest({ reason, issues })

/** Structural checks a decoded graph must pass before anything looks at it. */
const checkGraph = (graph: Graph.Graph, session: boolean): string | undefined => (session ? checkSession : checkTrace)(graph)

const checkSession = perObject((graph: Graph.Graph) => findProblem(graph, true))
const checkTrace = perObject((graph: Graph.Graph) => findProblem(graph, false))

const findProblem = (graph: Graph.Graph, session: boolean): string | undefined => {
  if (session ? graph.invokes !== 0 : !Number.isSafeInteger(graph.invokes) || graph.invokes < 1 || graph.invokes > 4096) {
    return session ? "a session graph has no invokes of its own" : `invokes must be an integer in 1..4096, got ${graph.invokes}`
  }
  const nodes = allNodes(graph)
  const ids = new Set<number>()
  for (const n of nodes) {
    if (!Number.isSafeInteger(n.id) || n.id < 0) return `node ids must be non-negative integers, got ${n.id}`
    if (ids.has(n.id)) return `node id ${n.id} appears twice`
    ids.add(n.id)
  }
  // invoke -1 addresses every row (a model edit)
  const invokeOk = (i: number) => Number.isSafeInteger(i) && i >= -1 && i < graph.invokes
  for (const n of nodes) {
    for (const d of Graph.dependencies(n)) if (!ids.has(d)) return `node %${n.id} refers to %${d}, which is not in the graph`
    if (n._tag === "Call") return `node %${n.id} calls a local TypeScript function (apply), which cannot run on a server; only graph operations can`
    if ((n._tag === "Hook" || n._tag === "Set") && !session) {
      if (!invokeOk(n.ref.invoke)) return `node %${n.id} addresses invoke ${n.ref.invoke} of ${graph.invokes}`
      if (!Number.isSafeInteger(n.ref.call) || n.ref.call < 0 || !Number.isSafeInteger(n.ref.index)) return `node %${n.id} has a malformed hook`
    }
    if ((n._tag === "Apply" || n._tag === "Generated") && !session && !invokeOk(n.invoke)) return `node %${n.id} addresses invoke ${n.invoke} of ${graph.invokes}`
  }
  for (const r of Graph.resultRefs(graph.result)) if (!ids.has(r)) return `the result refers to %${r}, which is not in the graph`
  return undefined
}

const checkRows = (rows: ReadonlyArray<Local.Rows>, invokes: number): string | undefined => {
  if (rows.length !== invokes) return `the graph has ${invokes} invokes but the request gives rows for ${rows.length}`
  let at = 0
  for (const r of rows) {
    if (r.start !== at) return "invoke rows must be contiguous and start at 0"
    at += r.count
  }
  return undefined
}

/** Whether every hook of the graph reads or writes a tensor whose first dimension is the batch. */
const batchedHooks = (hosted: Hosted, feeds: Readonly<Record<string, Tensor>>, graph: Graph.Graph, batch: number): boolean => {
  const entries = Object.entries(feeds)
  if (entries.length === 0 || entries.some(([, t]) => t.shape.length === 0 || t.shape[0] !== batch)) return false
  const sym = Shapes.symbol("nnsight_batch")
  const signature = feedsKey(feeds, 1)
  let perHook = batchedCache.get(hosted, signature)
  if (perHook === undefined) {
    const fakes = Scan.forward(hosted.runtime.loaded, Object.fromEntries(entries.map(([n, t]) => [n, { dtype: t.dtype, shape: [sym, ...t.shape.slice(1)] }])))
    const mods = Scan.modules(hosted.runtime.loaded, fakes)
    const made = new Map<string, boolean>()
    for (const [path, calls] of mods) {
      calls.forEach((c, call) => {
        const batched = (point: "input" | "output") => (f: Shapes.Fake, index: number) =>
          made.set(Scan.hookKey({ module: path, call, point, index }), f.shape.length > 0 && Shapes.dimEquals(f.shape[0], sym))
        c.inputs.forEach(batched("input"))
        c.outputs.forEach(batched("output"))
      })
    }
    batchedCache.set(hosted, signature, (perHook = made))
  }
  for (const n of graph.nodes) {
    if (n._tag !== "Hook" && n._tag !== "Set") continue
    const calls = hosted.runtime.loaded.tree.modules.get(n.ref.module)?.calls.length ?? 0
    if (calls === 0 || n.ref.call >= calls) return false
    if (perHook.get(Scan.hookKey(n.ref)) !== true) return false
  }
  return true
}

/**
 * A memo per hosted model, cleared when it holds `bound` entries: a server
 * sees few distinct experiments and input shapes at a time.
 */
const perModel = <A>(bound: number) => {
  const byModel = new WeakMap<object, Map<string, A>>()
  return {
    get: (hosted: Hosted, key: string): A | undefined => byModel.get(hosted.runtime.loaded)?.get(key),
    set: (hosted: Hosted, key: string, a: A) => {
      let m = byModel.get(hosted.runtime.loaded)
      if (m === undefined) byModel.set(hosted.runtime.loaded, (m = new Map()))
      if (m.size >= bound) m.clear()
      m.set(key, a)
    }
  }
}

const batchedCache = perModel<ReadonlyMap<string, boolean>>(32)

/** What {@link stackRows} learned of a graph at given row shapes (`null`: its jobs cannot stack). */
const stackable = perModel<ReadonlySet<number> | null>(256)

/** What admission learned of a graph at given input shapes (see {@link admit}). */
interface Admitted {
  readonly estimate: number
  readonly largest: number
  readonly eligible: boolean
}

const admitted = perModel<Admitted>(1024)

const graphHash = perObject(Graph.hash)

/** The feeds' names, dtypes and shapes from axis `from` (0 or 1) on. */
const feedsKey = (feeds: Readonly<Record<string, Tensor>>, from: 0 | 1): string => feedsKeys(feeds)[from]

const feedsKeys = perObject((feeds: Readonly<Record<string, Tensor>>): readonly [string, string] => {
  let whole = ""
  let rows = ""
  for (const name of Object.keys(feeds).sort()) {
    const { dtype, shape } = feeds[name]
    // by hand: slice and join on a tensor's frozen shape are slow paths in V8
    let rest = ""
    for (let i = 1; i < shape.length; i++) rest += i > 1 ? `x${shape[i]}` : `${shape[i]}`
    whole += `${name}:${dtype}:${shape.length > 0 ? shape[0] : ""}|${rest};`
    rows += `${name}:${dtype}:${rest};`
  }
  return [whole, rows]
})

/** Jobs whose feeds agree on all but the batch size may share a forward pass. */
const coBatchKeyOf = (feeds: Readonly<Record<string, Tensor>>): string => feedsKey(feeds, 1)

const fakeBytes = (f: Scan.Value | undefined): number | undefined => {
  if (f === undefined) return undefined
  if (Array.isArray(f)) return (f as ReadonlyArray<Shapes.Fake>).reduce<number | undefined>((a, x) => (a === undefined ? undefined : ((b) => (b === undefined ? undefined : a + b))(fakeBytes(x))), 0)
  const shape = Shapes.concrete((f as Shapes.Fake).shape)
  if (shape === undefined) return undefined
  const { dtype } = f as Shapes.Fake
  return shape.reduce((a, b) => a * b, 1) * (dtype === "string" ? 16 : Math.max(1, dtypeBytes(dtype)))
}

const dtypeBytes = (dtype: string): number => (DType.isDType(dtype) ? DType.byteSize(dtype) : 1)

/**
 * Admits a decoded submission for a key: everything a job must satisfy
 * before it is queued. Fails with the typed 4xx the client gets.
 *
 * @since 0.1.0
 */
export const admit = (
  submission: Protocol.Submission,
  key: { readonly id: string; readonly limits: Protocol.Limits },
  registry: Registry["Service"],
  coBatch: boolean
): Effect.Effect<JobSpec, Protocol.UnknownModel | Protocol.LimitExceeded | Protocol.GraphRejected | Protocol.BadRequest> =>
  Effect.gen(function*() {
    const { request } = submission
    const hosted = registry.get(request.model)
    if (hosted === undefined) return yield* new Protocol.UnknownModel({ model: request.model, available: registry.list.map((h) => h.key) })
    const { graph } = request
    const nodeCount = allNodes(graph).length
    if (nodeCount > key.limits.graphNodes) return yield* new Protocol.LimitExceeded({ limit: "graphNodes", value: nodeCount, max: key.limits.graphNodes })
    const structural = checkGraph(graph, request.kind === "session")
    if (structural !== undefined) return yield* bad(`invalid graph: ${structural}`)

    // a session carries its inputs in the graph
    if (request.kind === "session") {
      if (request.inputs._tag !== "Feeds" || request.inputs.rows.length > 0 || Object.keys(submission.feeds).length > 0) {
        return yield* bad("a session carries its inputs in its graph: send no feeds, rows or prompts")
      }
      if (request.generate !== undefined) return yield* bad("generation options are only for generate requests")
      return {
        owner: key.id,
        limits: key.limits,
        model: hosted.key,
        kind: request.kind,
        graph,
        feeds: {},
        rows: [],
        generate: undefined,
        coBatchKey: undefined
      }
    }

    // inputs
    let feeds: Readonly<Record<string, Tensor>> = submission.feeds
    let rows: ReadonlyArray<Local.Rows>
    if (request.inputs._tag === "Prompts") {
      if (hosted.language === undefined) return yield* bad(`model "${hosted.key}" is not a language model: send tensors, not prompts`)
      if (Object.keys(feeds).length > 0) return yield* bad("send prompts or tensors, not both")
      if (request.inputs.prompts.length !== graph.invokes) {
        return yield* bad(`the graph has ${graph.invokes} invokes but the request has ${request.inputs.prompts.length} prompts`)
      }
      const lm = hosted.language
      const prompts = request.inputs.prompts
      const batch = yield* Effect.try({
        try: () => lm.batch(prompts as ReadonlyArray<LanguageModel["batch"] extends (i: ReadonlyArray<infer P>) => unknown ? P : never>),
        catch: (e) =>
          Errors.isTraceError(e) ? new Protocol.GraphRejected({ error: e }) : bad(`cannot tokenize the prompts: ${e instanceof Error ? e.message : String(e)}`)
      })
      feeds = batch.feeds
      rows = batch.rows
    } else {
      rows = request.inputs.rows
      const bad_ = checkRows(rows, graph.invokes)
      if (bad_ !== undefined) return yield* bad(bad_)
    }
    const batch = batchOf(rows)

    // generation
    if (request.kind === "generate") {
      if (request.generate === undefined) return yield* bad("a generate request needs its generation options")
      if (feeds.input_ids === undefined || feeds.input_ids.shape.length !== 2) return yield* bad("generation needs an input_ids feed of shape [batch, sequence]")
      if (allNodes(graph).some((n) => n._tag === "Log")) return yield* bad("log() inside a remote generation is not supported yet")
    } else if (request.generate !== undefined) return yield* bad("generation options are only for generate requests")

    // tokens
    const ids = feeds.input_ids
    const tokens = (ids !== undefined ? ids.shape.reduce((a, b) => a * b, 1) : batch) +
      (request.kind === "generate" ? request.generate!.maxNewTokens * batch : 0)
    if (tokens > key.limits.tokens) return yield* new Protocol.LimitExceeded({ limit: "tokens", value: tokens, max: key.limits.tokens })

    // what follows depends only on the graph's structure, the inputs' shapes and the model:
    // a client that runs one experiment over many prompts is checked once (failures are
    // not remembered, so each names its own lines)
    const shapeKey = request.kind !== "trace" ? undefined : `${request.isolated === true}|${JSON.stringify(rows)}|${feedsKey(feeds, 0)}|${graphHash(graph)}`
    // the key's limits, then the job (co-batched when its graph and feeds allow)
    const accept = (a: Admitted | undefined) =>
      Effect.gen(function*() {
        if (a !== undefined && a.estimate > key.limits.savedBytes) {
          return yield* new Protocol.LimitExceeded({ limit: "savedBytes", value: a.estimate, max: key.limits.savedBytes })
        }
        if (a !== undefined && a.largest > key.limits.valueBytes) {
          return yield* new Protocol.LimitExceeded({ limit: "valueBytes", value: a.largest, max: key.limits.valueBytes })
        }
        const spec: JobSpec = {
          owner: key.id,
          limits: key.limits,
          model: hosted.key,
          kind: request.kind,
          graph,
          feeds,
          rows,
          generate: request.generate,
          coBatchKey: a?.eligible && coBatch ? coBatchKeyOf(feeds) : undefined
        }
        return spec
      })
    const known = shapeKey === undefined ? undefined : admitted.get(hosted, shapeKey)
    if (known !== undefined) return yield* accept(known)

    // hooks and modules resolve as a local run resolves them
    const started = yield* Local.start(hosted.runtime, graph, rows).pipe(Effect.exit)
    if (Exit.isFailure(started)) {
      const e = Cause.squash(started.cause)
      return yield* Errors.isTraceError(e) ? new Protocol.GraphRejected({ error: e }) : bad(`invalid graph: ${e instanceof Error ? e.message : String(e)}`)
    }

    // shapes: saved bytes, and whether the job can share a forward pass
    if (request.kind === "trace") {
      let scanned: Scan.Outcome | undefined
      try {
        scanned = Scan.run(hosted.runtime.loaded, { graph, inputs: feeds, rows })
      } catch {
        scanned = undefined
      }
      if (scanned !== undefined) {
        let estimate = 0
        let largest = 0
        for (const id of Graph.resultRefs(graph.result)) estimate += fakeBytes(scanned.values.get(id) as Scan.Value | undefined) ?? 0
        for (const f of scanned.values.values()) largest = Math.max(largest, fakeBytes(f as Scan.Value) ?? 0)
        let eligible = request.isolated !== true && allNodes(graph).every((n) =>
          mergeable.has(n._tag) && !((n._tag === "Hook" || n._tag === "Set") && n.ref.invoke < 0)
        )
        if (eligible) {
          try {
            eligible = batchedHooks(hosted, feeds, graph, batch)
          } catch {
            eligible = false
          }
        }
        const learned = { estimate, largest, eligible }
        if (shapeKey !== undefined) admitted.set(hosted, shapeKey, learned)
        return yield* accept(learned)
      }
    }
    return yield* accept(undefined)
  })

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

/**
 * Options of the HTTP layer.
 *
 * @since 0.1.0
 */
export interface HttpOptions {
  /** Largest request body in bytes (default 64 MiB). */
  readonly maxBodyBytes?: number
  /** Co-batch compatible trace jobs (default true). */
  readonly coBatch?: boolean
}

const isMaxBytes = (u: unknown): boolean => {
  for (let e = u as { _tag?: string; cause?: unknown; message?: string } | undefined, k = 0; e !== undefined && e !== null && k < 8; e = e.cause as typeof e, k++) {
    if (e._tag === "MaxBytesError" || e.message === "maxBytes exceeded") return true
  }
  return false
}

/**
 * The API's handlers and middleware, needing a {@link Registry},
 * {@link JobQueue} and {@link Keys}.
 *
 * @since 0.1.0
 */
export const apiLayer = (options: HttpOptions = {}) => {
  const maxBody = options.maxBodyBytes ?? 64 * 1024 * 1024
  const coBatch = options.coBatch ?? true

  const SystemLive = HttpApiBuilder.group(Protocol.Api, "system", (handlers) =>
    Effect.gen(function*() {
      const registry = yield* Registry
      return handlers.handle("health", () =>
        Effect.succeed({ status: "ok" as const, version: Protocol.version, models: registry.list.map((h) => h.key) }))
    }))

  const JobsLive = HttpApiBuilder.group(Protocol.Api, "jobs", (handlers) =>
    Effect.gen(function*() {
      const registry = yield* Registry
      const queue = yield* JobQueue
      // admitted for the caller's key, then queued (a refusal counts as rejected)
      const submit = (payload: Protocol.Submission) =>
        Effect.gen(function*() {
          const key = yield* Protocol.CurrentKey
          const spec = yield* admit(payload, key, registry, coBatch).pipe(Effect.tapError(() => queue.rejected))
          return { key, status: yield* queue.submit(spec) }
        })
      return handlers
        .handle("models", () => Effect.succeed(registry.list.map((h) => h.info)))
        .handle("stats", () => queue.stats)
        .handle("submit", ({ payload }) => Effect.map(submit(payload), ({ status }) => status))
        .handle("run", ({ payload }) =>
          Effect.gen(function*() {
            const { key, status: { id } } = yield* submit(payload)
            // its log lines travel in the result; a caller that hangs up no longer wants the job
            const logs = yield* queue.ended(key.id, id).pipe(
              Effect.orDie,
              Effect.onInterrupt(() => Effect.ignore(queue.cancel(key.id, id)))
            )
            const result = yield* queue.result(key.id, id).pipe(
              Effect.catchTag(["JobNotFound", "NotReady"], (e) => Effect.die(e))
            )
            return logs.length === 0 ? result : { ...result, logs }
          }))
        .handle("status", ({ params }) => Effect.gen(function*() { return yield* queue.status((yield* Protocol.CurrentKey).id, params.id) }))
        .handle("events", ({ params }) => Effect.gen(function*() { return yield* queue.events((yield* Protocol.CurrentKey).id, params.id) }))
        .handle("result", ({ params }) => Effect.gen(function*() { return yield* queue.result((yield* Protocol.CurrentKey).id, params.id) }))
        .handle("cancel", ({ params }) => Effect.gen(function*() { return yield* queue.cancel((yield* Protocol.CurrentKey).id, params.id) }))
    }))

  const AuthLive = Layer.effect(
    Protocol.Authorization,
    Effect.gen(function*() {
      const keys = yield* Keys
      return Protocol.Authorization.of({
        bearer: (httpEffect, { credential }) =>
          Effect.flatMap(keys.authenticate(Redacted.value(credential)), (key) => Effect.provideService(httpEffect, Protocol.CurrentKey, key))
      })
    })
  )

  const GuardLive = Layer.succeed(
    Protocol.Guard,
    (httpEffect) =>
      Effect.gen(function*() {
        const request = yield* HttpServerRequest.HttpServerRequest
        if (request.method === "POST") {
          const type = (request.headers["content-type"] ?? "").split(";")[0].trim().toLowerCase()
          if (type !== "application/octet-stream") {
            return yield* bad(`the body must be a tensor container sent as application/octet-stream, not ${JSON.stringify(type)}`)
          }
        }
        const length = request.headers["content-length"]
        if (length !== undefined) {
          const size = Number(length)
          if (!Number.isFinite(size) || size < 0) return yield* bad("malformed content-length")
          if (size > maxBody) return yield* new Protocol.PayloadTooLarge({ size, limit: maxBody })
        }
        return yield* httpEffect.pipe(
          Effect.provideService(HttpIncomingMessage.MaxBodySize, BigInt(maxBody) as never),
          Effect.catchDefect((d) => (isMaxBytes(d) ? Effect.fail(new Protocol.PayloadTooLarge({ size: -1, limit: maxBody })) : Effect.die(d))),
          Effect.catch((e: unknown) => {
            const tagged = e as { _tag?: string; kind?: string; cause?: { issue?: unknown; message?: string } }
            if (tagged?._tag === "HttpApiSchemaError" && tagged.kind !== "Body" && tagged.kind !== "ResponseHeaders") {
              const message = tagged.cause?.message ?? "the request does not decode"
              return Effect.fail(bad(`the request does not decode (${tagged.kind})`, message.split("\n").slice(0, 50)))
            }
            return Effect.fail(e as never)
          })
        )
      })
  )

  return HttpApiBuilder.layer(Protocol.Api).pipe(
    Layer.provide([SystemLive, JobsLive]),
    Layer.provide([AuthLive, GuardLive])
  )
}

/**
 * Options of {@link start}.
 *
 * @since 0.1.0
 */
export interface StartOptions extends HttpOptions {
  /** The models to host, by key. */
  readonly models: ReadonlyArray<{ readonly key: string; readonly model: TracedModel<any> }>
  /** API keys: hashed entries (key file) or plain keys (hashed in memory). */
  readonly keys: ReadonlyArray<KeyEntry | PlainKey>
  /** Limits of keys that do not set their own. */
  readonly limits?: Partial<Protocol.Limits>
  /** Port (default 8470; 0 picks a free one). */
  readonly port?: number
  /** Interface (default 127.0.0.1). */
  readonly host?: string
  /** Co-batching (default on, 16 rows / 16 jobs per pass). */
  readonly coBatch?: boolean
  readonly coBatchMaxRows?: number
  readonly coBatchMaxJobs?: number
  /** How long finished jobs' results are kept (default 10 minutes). */
  readonly resultTtlMs?: number
  /** Log each HTTP request (default false). */
  readonly logRequests?: boolean
}

/**
 * A running server.
 *
 * @since 0.1.0
 */
export interface Running {
  /** `http://host:port` */
  readonly url: string
  readonly port: number
  /** The server's counters. */
  readonly stats: () => Promise<Protocol.Stats>
  /** Stops serving and interrupts the workers (models stay open: close them yourself). */
  readonly close: () => Promise<void>
}

/**
 * The whole server as a layer (HTTP server included).
 *
 * @since 0.1.0
 */
export const layer = (options: StartOptions) =>
  layerWith(
    options,
    JobQueue.layerMemory({
      coBatch: { enabled: options.coBatch ?? true, maxRows: options.coBatchMaxRows, maxJobs: options.coBatchMaxJobs },
      resultTtlMs: options.resultTtlMs
    })
  )

/**
 * The whole server as a layer, with the given {@link JobQueue} (e.g. the
 * cluster-backed one of `Cluster`); the queue may need the {@link Registry},
 * which this layer provides.
 *
 * @since 0.1.0
 */
export const layerWith = <E, R>(options: StartOptions, queue: Layer.Layer<JobQueue, E, R>) => {
  const services = Layer.mergeAll(queue, Layer.effect(Keys, makeKeys(options.keys, options.limits))).pipe(
    Layer.provideMerge(Registry.layer(options.models))
  )
  return HttpRouter.serve(apiLayer(options), { disableLogger: options.logRequests !== true, disableListenLog: true }).pipe(
    Layer.provideMerge(services),
    Layer.provideMerge(NodeHttpServer.layer(() => createServer({ keepAliveTimeout: 10_000 }), { port: options.port ?? 8470, host: options.host ?? "127.0.0.1" }))
  )
}

/**
 * Starts a server in this process.
 *
 * @example
 * const server = await Server.start({ models: [{ key: "tiny", model }], keys: [{ id: "me", key: "secret" }], port: 0 })
 * await model.trace(x, fn, { backend: Remote.backend({ url: server.url, apiKey: "secret" }) })
 * await server.close()
 *
 * @since 0.1.0
 */
export const start = (options: StartOptions): Promise<Running> => startLayer(layer(options), options.host)

/**
 * Starts a server layer (from {@link layer} or {@link layerWith}) in this
 * process; `host` is the interface it listens on (for its URL).
 *
 * @since 0.1.0
 */
export const startLayer = async (
  serverLayer: Layer.Layer<HttpServer.HttpServer | JobQueue, unknown>,
  host?: string
): Promise<Running> => {
  const scope = Effect.runSync(Scope.make())
  try {
    const context = await Effect.runPromise(Layer.buildWithScope(serverLayer, scope))
    const server = Context.get(context, HttpServer.HttpServer)
    const queue = Context.get(context, JobQueue)
    const address = server.address
    const port = address._tag === "UnixPathAddress" ? 0 : address.port
    const hostname = host ?? "127.0.0.1"
    const urlHost = hostname.includes(":") ? `[${hostname}]` : hostname
    return {
      url: `http://${urlHost === "0.0.0.0" ? "127.0.0.1" : urlHost}:${port}`,
      port,
      stats: () => Effect.runPromise(queue.stats),
      close: () => Effect.runPromise(Scope.close(scope, Exit.void))
    }
  } catch (e) {
    await Effect.runPromise(Scope.close(scope, Exit.void))
    throw e
  }
}
