/**
 * The remote client: runs traces and generations on an nnsight-ts server
 * (see `Server`) instead of locally, with the same results.
 *
 * - {@link backend} is a `Backend` service: pass it to `trace` and the call
 *   encodes the graph and the batched inputs, submits them, follows the
 *   job's events (progress, log lines), downloads the result and decodes it
 *   into `Tensor`s, the same `Outcome` a local run gives. Errors raised
 *   inside the run come back as the same typed `Errors` with the user's line.
 * - {@link generate} is the remote twin of `Generate.run` (tokens arrive as
 *   events and reach `onToken`).
 * - {@link submit} is the non-blocking form: a {@link Job} handle to poll,
 *   stream, await, or cancel, from this process or (with {@link job}) another.
 * - Graphs that hold local TypeScript functions (`apply(fn, ...)`, functions
 *   in attributes or results) are refused before anything is sent: only
 *   graph operations cross the wire.
 *
 * @example
 * import * as Remote from "nnsight-ts/remote/Client"
 * const remote = Remote.backend({ url: "http://127.0.0.1:8470", apiKey: process.env.NNSIGHT_API_KEY! })
 * const { logits } = await model.trace(prompt, (m) => ({ logits: m.lm_head.output }), { backend: remote })
 *
 * @since 0.1.0
 */
import { Cause, Effect, Exit, Schedule, Schema, Stream } from "effect"
import { NodeHttpClient } from "@effect/platform-node"
import { HttpClient, HttpClientRequest } from "effect/http"
import { HttpApiClient } from "effect/http-api"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import type { Tensor } from "../core/Tensor.js"
import type { Service as BackendService } from "../backends/Backend.js"
import type * as Generate from "../backends/Generate.js"
import type * as Local from "../backends/Local.js"
import type * as Values from "../backends/Values.js"
import * as Protocol from "./Protocol.js"

/**
 * Where and how to run remotely.
 *
 * @since 0.1.0
 */
export interface Options {
  /** The server, e.g. `http://127.0.0.1:8470`. */
  readonly url: string
  /** An API key the server knows. */
  readonly apiKey: string
  /**
   * The server's key of the model. Default: the hosted model whose
   * fingerprint (module tree and inputs) matches the local model's.
   */
  readonly model?: string
  /** Print progress lines (queued, running, completed) to stderr, or give them to a function. */
  readonly progress?: boolean | ((line: string) => void)
  /** Every event of every job. */
  readonly onEvent?: (event: Protocol.JobEvent, job: string) => void
  /** Lines the graph's `log(...)` nodes print on the server (default: `console.log`). */
  readonly onLog?: (line: string) => void
  /** Do not share a forward pass with other requests (co-batching). */
  readonly isolated?: boolean
}

/**
 * A transport failure: the server is unreachable, or answered something
 * that is not the protocol.
 *
 * @since 0.1.0
 */
export class TransportError extends Schema.TaggedError<TransportError>()("TransportError", {
  url: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `cannot reach the nnsight-ts server at ${this.url}: ${this.reason}`
  }
}

/**
 * What a remote call can fail with besides a trace error: a typed 4xx, a
 * job error that is not a trace error (a limit, cancellation, an internal
 * error), or a transport failure.
 *
 * @since 0.1.0
 */
export type RemoteFailure =
  | Protocol.Unauthorized
  | Protocol.BadRequest
  | Protocol.UnknownModel
  | Protocol.JobNotFound
  | Protocol.PayloadTooLarge
  | Protocol.LimitExceeded
  | Protocol.TooManyJobs
  | Protocol.NotReady
  | Protocol.JobCancelled
  | Protocol.InternalError
  | TransportError

/**
 * What a remote run gives: the outcome a local run gives, and the token ids
 * of a generation.
 *
 * @since 0.1.0
 */
export interface RemoteOutcome extends Local.Outcome {
  readonly tokens?: Tensor
}

/**
 * One job's inputs.
 *
 * @since 0.1.0
 */
export interface JobInput {
  readonly kind: Protocol.JobKind
  readonly graph: Graph.Graph
  /** The local model: its fingerprint finds the server's model when `model` is not set. */
  readonly runtime?: Local.Runtime
  /** The server's model key (overrides the options'). */
  readonly model?: string
  /** Batched model inputs and each invoke's rows... */
  readonly feeds?: Readonly<Record<string, Tensor>>
  readonly rows?: ReadonlyArray<Local.Rows>
  /** ...or, for language models, one prompt per invoke, tokenized on the server. */
  readonly prompts?: ReadonlyArray<Protocol.Prompt>
  /** Generation options (`kind: "generate"`); `onToken` is called as tokens arrive. */
  readonly generate?: Generate.Options
}

/**
 * A submitted job.
 *
 * @since 0.1.0
 */
export interface Job {
  readonly id: string
  readonly model: string
  /** Its status now. */
  readonly status: () => Promise<Protocol.JobStatus>
  /** Its events from the start (a finished job's stream ends at once). */
  readonly events: () => AsyncIterable<Protocol.JobEvent>
  /** Waits for it to finish and gives its outcome; rejects with its error. */
  readonly result: () => Promise<RemoteOutcome>
  /** Cancels it (a job already running finishes its pass, then is dropped). */
  readonly cancel: () => Promise<Protocol.JobStatus>
  /** The same, as Effects with typed errors. */
  readonly effect: {
    readonly status: Effect.Effect<Protocol.JobStatus, RemoteFailure>
    readonly events: Stream.Stream<Protocol.JobEvent, RemoteFailure>
    readonly result: Effect.Effect<RemoteOutcome, Errors.TraceError | RemoteFailure>
    readonly cancel: Effect.Effect<Protocol.JobStatus, RemoteFailure>
  }
}

type Client = HttpApiClient.ForApi<typeof Protocol.Api>

const clients = new Map<string, Client>()

const wireTags = new Set([
  "Unauthorized",
  "BadRequest",
  "UnknownModel",
  "JobNotFound",
  "PayloadTooLarge",
  "LimitExceeded",
  "TooManyJobs",
  "NotReady",
  "GraphRejected",
  "JobFailed"
])

const describe = (e: unknown): string => {
  if (e instanceof Error) return e.message
  if (typeof e === "object" && e !== null && "message" in e) return String((e as { message: unknown }).message)
  return String(e)
}

/** Wire errors as they are; anything else is a transport failure. */
const classify = (url: string) => (e: unknown): RemoteFailure | Protocol.GraphRejected | Protocol.JobFailed =>
  typeof e === "object" && e !== null && wireTags.has((e as { _tag?: string })._tag ?? "")
    ? (e as RemoteFailure | Protocol.GraphRejected | Protocol.JobFailed)
    : new TransportError({ url, reason: describe(e) })

/** A job error as the caller sees it: trace errors as themselves. */
const unwrap = (e: RemoteFailure | Protocol.GraphRejected | Protocol.JobFailed): Errors.TraceError | RemoteFailure => {
  if (e._tag === "GraphRejected") return e.error
  if (e._tag === "JobFailed") return e.error
  return e
}

// node:http with a keep-alive agent: fetch's streams cost the client several times the CPU per request
const nodeHttp = NodeHttpClient.layerNodeHttpOptions({ keepAlive: true })

const clientFor = (options: Options): Effect.Effect<Client> =>
  Effect.suspend(() => {
    const key = `${options.url}\u0000${options.apiKey}`
    const hit = clients.get(key)
    if (hit !== undefined) return Effect.succeed(hit)
    return HttpApiClient.make(Protocol.Api, {
      baseUrl: options.url,
      transformClient: HttpClient.mapRequest(HttpClientRequest.bearerToken(options.apiKey))
    }).pipe(
      Effect.provide(nodeHttp),
      Effect.tap((c) => Effect.sync(() => clients.set(key, c)))
    )
  })

const call = <A, E>(options: Options, f: (c: Client) => Effect.Effect<A, E>) =>
  Effect.flatMap(clientFor(options), f).pipe(Effect.mapError(classify(options.url)))

/**
 * Why a graph cannot run remotely: it calls local TypeScript functions
 * (or holds one in an attribute or its result). `undefined` when it can.
 *
 * @example
 * const error = Remote.localFunctions(graph)
 *
 * @since 0.1.0
 */
export const localFunctions = (graph: Graph.Graph): Errors.InvalidValue | undefined => {
  const holdsFunction = (u: unknown, depth = 0): boolean => {
    if (typeof u === "function" || typeof u === "symbol") return true
    if (depth > 64 || u === null || typeof u !== "object") return false
    if (ArrayBuffer.isView(u)) return false
    return Object.values(u as Record<string, unknown>).some((v) => holdsFunction(v, depth + 1))
  }
  for (const node of Graph.flatten(graph.nodes)) {
    if (node._tag === "Call") {
      return new Errors.InvalidValue({
        site: node.site,
        reason: "this graph calls a local TypeScript function (apply), which cannot run on a remote server: only graph operations cross the wire; run it locally, or express it with tensor operations"
      })
    }
    const { _tag, ...rest } = node as Graph.Node & Record<string, unknown>
    const body = _tag === "Cond" || _tag === "Iter" || _tag === "Trace" ? { ...rest, then: [], otherwise: [], body: [] } : rest
    if (holdsFunction(body)) {
      return new Errors.InvalidValue({
        site: node.site,
        reason: "this operation holds a local TypeScript function, which cannot run on a remote server: only graph operations cross the wire"
      })
    }
  }
  if (holdsFunction(graph.result)) {
    return new Errors.InvalidValue({
      site: "",
      reason: "the trace returns a local TypeScript function, which cannot come back from a remote server: return tensors and plain values"
    })
  }
  return undefined
}

const modelsCache = new Map<string, ReadonlyArray<Protocol.ModelInfo>>()

/** The server's key for the model a job runs on. */
const modelKey = (options: Options, input: JobInput): Effect.Effect<string, RemoteFailure> => {
  const wanted = input.model ?? options.model
  if (input.runtime === undefined) {
    return wanted !== undefined
      ? Effect.succeed(wanted)
      : Effect.fail(new Protocol.BadRequest({ reason: "name the server's model (options.model): there is no local model to match", issues: [] }))
  }
  const mine = Protocol.fingerprint(input.runtime.loaded)
  const cacheKey = `${options.url}\u0000${options.apiKey}`
  return Effect.gen(function*() {
    let models = modelsCache.get(cacheKey)
    if (models === undefined) {
      models = yield* call(options, (c) => c.jobs.models()) as Effect.Effect<ReadonlyArray<Protocol.ModelInfo>, RemoteFailure>
      modelsCache.set(cacheKey, models)
    }
    if (wanted !== undefined) {
      const info = models.find((m) => m.key === wanted)
      if (info !== undefined && info.fingerprint !== mine) {
        return yield* new Protocol.BadRequest({
          reason: `the server's model "${wanted}" is not the model this trace was recorded against (its module tree or inputs differ); load the same model locally`,
          issues: []
        })
      }
      return wanted
    }
    const match = models.filter((m) => m.fingerprint === mine)
    if (match.length === 0) {
      return yield* new Protocol.UnknownModel({ model: `<fingerprint ${mine}>`, available: models.map((m) => m.key) })
    }
    return match[0].key
  })
}

const progressLine = (id: string, e: Protocol.JobEvent): string | undefined => {
  const tag = `nnsight-ts remote ${id.slice(0, 8)}`
  switch (e._tag) {
    case "Received":
      return `${tag}: received by ${e.model}`
    case "Queued":
      return `${tag}: queued (position ${e.position})`
    case "Running":
      return `${tag}: running${e.batchedWith > 1 ? ` (sharing a forward pass with ${e.batchedWith - 1} other requests)` : ""}`
    case "Completed":
      return `${tag}: completed in ${e.elapsedMs} ms (${e.resultBytes} bytes)`
    case "Failed":
      return `${tag}: failed: ${e.error.message}`
    default:
      return undefined
  }
}

const toOutcome = (r: Protocol.JobResult): RemoteOutcome => ({
  values: new Map(r.values.map((v) => [v.id, v.value as Values.Val])),
  unavailable: new Map(r.unavailable.map((u) => [u.id, u.error])),
  ...(r.tokens === undefined ? {} : { tokens: r.tokens })
})

const makeJob = (options: Options, id: string, model: string, onToken?: Generate.Options["onToken"]): Job => {
  const report = (e: Protocol.JobEvent) => {
    options.onEvent?.(e, id)
    if (options.progress) {
      const line = progressLine(id, e)
      if (line !== undefined) typeof options.progress === "function" ? options.progress(line) : process.stderr.write(line + "\n")
    }
    if (e._tag === "Log") (options.onLog ?? console.log)(e.message)
    if (e._tag === "Token") onToken?.({ step: e.step, tokens: e.tokens, finished: e.finished })
  }
  const status = call(options, (c) => c.jobs.status({ params: { id } })) as Effect.Effect<Protocol.JobStatus, RemoteFailure>
  const events: Stream.Stream<Protocol.JobEvent, RemoteFailure> = Stream.unwrap(
    call(options, (c) => c.jobs.events({ params: { id } }))
  ).pipe(Stream.mapError(classify(options.url))) as Stream.Stream<Protocol.JobEvent, RemoteFailure>
  const finished = (s: Protocol.JobStatus) => s.state === "completed" || s.state === "failed" || s.state === "cancelled"
  // follow the events to the end (reporting them); if the stream breaks, poll
  const wait = Effect.gen(function*() {
    let terminal = false
    yield* Stream.runForEach(events, (e) =>
      Effect.sync(() => {
        report(e)
        if (Protocol.isTerminal(e)) terminal = true
      })).pipe(Effect.ignore)
    if (!terminal) {
      yield* status.pipe(
        Effect.repeat({ schedule: Schedule.spaced("100 millis"), until: finished })
      )
    }
  })
  const fetchResult = (call(options, (c) => c.jobs.result({ params: { id } })) as Effect.Effect<Protocol.JobResult, RemoteFailure | Protocol.JobFailed>).pipe(
    Effect.mapError((e) => unwrap(e as RemoteFailure | Protocol.JobFailed)),
    Effect.map(toOutcome)
  )
  const result = Effect.andThen(wait, fetchResult)
  const cancel = call(options, (c) => c.jobs.cancel({ params: { id } })) as Effect.Effect<Protocol.JobStatus, RemoteFailure>
  return {
    id,
    model,
    status: () => runPromise(status),
    events: () => Stream.toAsyncIterable(events),
    result: () => runPromise(result),
    cancel: () => runPromise(cancel),
    effect: { status, events, result, cancel }
  }
}

/**
 * Submits a job and gives its handle at once (it runs on the server while
 * you do other things).
 *
 * @example
 * const job = yield* Remote.submitEffect(options, { kind: "trace", runtime: model.runtime, graph, feeds, rows })
 * const outcome = yield* job.effect.result
 *
 * @since 0.1.0
 */
export const submitEffect = (options: Options, input: JobInput): Effect.Effect<Job, Errors.TraceError | RemoteFailure> =>
  Effect.gen(function*() {
    const { model, payload } = yield* submission(options, input)
    const status = yield* (call(options, (c) => c.jobs.submit({ payload })) as Effect.Effect<Protocol.JobStatus, RemoteFailure | Protocol.GraphRejected>).pipe(
      Effect.mapError(unwrap)
    )
    return makeJob(options, status.id, model, input.generate?.onToken)
  })

/** The request a job sends, checked locally first. */
const submission = (options: Options, input: JobInput) =>
  Effect.gen(function*() {
    const refused = localFunctions(input.graph)
    if (refused !== undefined) return yield* refused
    const model = yield* modelKey(options, input)
    const g: Partial<Generate.Options> = input.generate ?? {}
    // only the generation options the protocol knows (never callbacks or other fields)
    const generate = {
      maxNewTokens: g.maxNewTokens ?? 1,
      doSample: g.doSample,
      temperature: g.temperature,
      topK: g.topK,
      topP: g.topP,
      seed: g.seed,
      eosTokenId: g.eosTokenId,
      padTokenId: g.padTokenId,
      useCache: g.useCache
    }
    const request: Protocol.JobRequest = {
      model,
      kind: input.kind,
      graph: input.graph,
      inputs: input.prompts !== undefined ? { _tag: "Prompts", prompts: input.prompts } : { _tag: "Feeds", rows: input.rows ?? [] },
      ...(input.kind === "generate" ? { generate: stripUndefined(generate) as Protocol.GenerateOptions } : {}),
      ...(options.isolated ? { isolated: true } : {}),
      client: `nnsight-ts/${Protocol.version}`
    }
    return { model, payload: { request, feeds: input.prompts !== undefined ? {} : (input.feeds ?? {}) } }
  })

const stripUndefined = <T extends object>(o: T): T =>
  Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined && typeof v !== "function")) as T

/**
 * Submits a job (Promise form of {@link submitEffect}).
 *
 * @example
 * const job = await Remote.submit({ url, apiKey }, { kind: "trace", runtime: model.runtime, graph, feeds, rows })
 * (await job.status()).state   // "queued" | "running" | ...
 * const outcome = await job.result()
 *
 * @since 0.1.0
 */
export const submit = (options: Options, input: JobInput): Promise<Job> => runPromise(submitEffect(options, input))

/**
 * The handle of a job submitted earlier (from this process or another).
 *
 * @since 0.1.0
 */
export const job = (options: Options, id: string): Job => makeJob(options, id, options.model ?? "")

/**
 * A failure of a remote run as a trace error (what `Backend` allows):
 * trace errors as themselves, anything else as an `ExecutionError` that
 * says what went wrong remotely.
 *
 * @since 0.1.0
 */
export const toTraceError = (e: Errors.TraceError | RemoteFailure): Errors.TraceError =>
  Errors.isTraceError(e) ? e : new Errors.ExecutionError({ site: "", reason: `remote execution failed: ${e.message}` })

/**
 * Runs a job to the end and decodes its result. With nothing to show
 * while it runs (no `progress`, `onEvent` or `onToken`), in one round trip
 * (`POST /v1/jobs/run`, log lines arriving with the result); otherwise it
 * submits, follows the events, then downloads.
 *
 * @since 0.1.0
 */
export const runEffect = (options: Options, input: JobInput): Effect.Effect<RemoteOutcome, Errors.TraceError | RemoteFailure> =>
  follows(options, input)
    ? Effect.flatMap(submitEffect(options, input), (j) => j.effect.result)
    : Effect.gen(function*() {
      // nothing to show while it runs: one round trip (submit, wait, download)
      const { payload } = yield* submission(options, input)
      const result = yield* (call(options, (c) => c.jobs.run({ payload })) as Effect.Effect<
        Protocol.JobResult,
        RemoteFailure | Protocol.GraphRejected | Protocol.JobFailed
      >).pipe(Effect.mapError(unwrap))
      for (const line of result.logs ?? []) (options.onLog ?? console.log)(line)
      return toOutcome(result)
    })

/** Whether a run shows its events as they come (progress, events, streamed tokens). */
const follows = (options: Options, input: JobInput): boolean =>
  (options.progress !== undefined && options.progress !== false) || options.onEvent !== undefined || input.generate?.onToken !== undefined

/**
 * A `Backend` that runs traces on a server.
 *
 * @example
 * const remote = Remote.backend({ url: server.url, apiKey })
 * await model.trace(prompt, fn, { backend: remote })
 *
 * @since 0.1.0
 */
export const backend = (options: Options): BackendService => ({
  execute: (request) =>
    runEffect(options, { kind: "trace", runtime: request.runtime, graph: request.graph, feeds: request.feeds, rows: request.rows }).pipe(
      Effect.mapError(toTraceError)
    )
})

/**
 * The remote twin of `Generate.run`: same arguments, same result.
 *
 * @example
 * const run = Remote.generate({ url, apiKey })
 * const { outcome, tokens } = yield* run(model.runtime, { graph, feeds, rows }, { maxNewTokens: 6 })
 *
 * @since 0.1.0
 */
export const generate = (options: Options) =>
(
  rt: Local.Runtime,
  req: Generate.Request,
  generateOptions: Generate.Options
): Effect.Effect<{ readonly outcome: Local.Outcome; readonly tokens: Tensor }, Errors.TraceError> =>
  runEffect(options, { kind: "generate", runtime: rt, graph: req.graph, feeds: req.feeds, rows: req.rows, generate: generateOptions }).pipe(
    Effect.mapError(toTraceError),
    Effect.flatMap((o) =>
      o.tokens === undefined
        ? Effect.fail(new Errors.ExecutionError({ site: "", reason: "remote execution failed: the server sent no tokens" }))
        : Effect.succeed({ outcome: o, tokens: o.tokens })
    )
  )

/**
 * Runs a session graph (`model.recordSession(fn).graph`) on a server: the
 * remote twin of `Session.execute`, with the traces' inputs batched by the
 * server's copy of the model.
 *
 * @example
 * const outcome = yield* Remote.session({ url, apiKey })(model.runtime, model.recordSession(fn).graph)
 *
 * @since 0.1.0
 */
export const session = (options: Options) =>
(rt: Local.Runtime, graph: Graph.Graph): Effect.Effect<Local.Outcome, Errors.TraceError> =>
  runEffect(options, { kind: "session", runtime: rt, graph, feeds: {}, rows: [] }).pipe(Effect.mapError(toTraceError))

/**
 * The server's models.
 *
 * @since 0.1.0
 */
export const models = (options: Options): Promise<ReadonlyArray<Protocol.ModelInfo>> =>
  runPromise(call(options, (c) => c.jobs.models()) as Effect.Effect<ReadonlyArray<Protocol.ModelInfo>, RemoteFailure>)

/**
 * The server's counters.
 *
 * @since 0.1.0
 */
export const stats = (options: Options): Promise<Protocol.Stats> =>
  runPromise(call(options, (c) => c.jobs.stats()) as Effect.Effect<Protocol.Stats, RemoteFailure>)

const runPromise = <A, E>(effect: Effect.Effect<A, E>): Promise<A> =>
  Effect.runPromiseExit(effect).then((exit) => {
    if (Exit.isSuccess(exit)) return exit.value
    throw Cause.squash(exit.cause)
  })
