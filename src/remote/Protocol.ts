/**
 * The remote-execution protocol: the typed HTTP API a server exposes and a
 * client calls (effect's `HttpApi`), the Schemas of requests, statuses,
 * events and results, the errors that cross the wire, and the binary tensor
 * container both directions use.
 *
 * - **Tensors** travel in a safetensors container: an 8-byte little-endian
 *   header length, a JSON header (`{ name: { dtype, shape, data_offsets } }`
 *   plus `__metadata__`, a map of strings), then the little-endian bytes of
 *   every tensor. String tensors (which safetensors has no dtype for) travel
 *   as JSON in the metadata.
 * - **A submission** is one container: the model inputs (batched feeds) as
 *   tensors, and the request (model key, encoded graph, invoke rows or
 *   prompts, generation options) as JSON in `__metadata__.request`. The
 *   server decodes it strictly (`onExcessProperty: "error"`).
 * - **A result** is one container: every saved value as tensor `v<node id>`,
 *   the generated tokens as `tokens`, and the values that are unavailable
 *   (with their typed error) in `__metadata__.result`.
 * - **Events** stream as Server-Sent Events: received, queued (with the
 *   position), running, log lines, generated tokens, completed, failed.
 * - **`POST /v1/jobs/run`** submits, waits and answers with the result in
 *   one round trip (the log lines in the result): a blocking call that
 *   follows no events saves two requests, which is most of a small job's
 *   cost on the server.
 * - **Errors**: every 4xx is a `Schema.TaggedError` with its status; errors
 *   raised inside a run are the local interpreter's `Errors.TraceError`s,
 *   with the user's line (`site`), carried in `JobFailed` / `Failed`.
 *
 * @example
 * import * as Protocol from "nnsight-ts/remote/Protocol"
 * const bytes = Protocol.encodeTensors({ x: Tensor.from([1, 2]) }, { note: "hi" })
 * Protocol.decodeTensors(bytes).tensors.x.equals(Tensor.from([1, 2])) // true
 *
 * @since 0.1.0
 */
import { createHash } from "node:crypto"
import * as os from "node:os"
import { Context, Effect, Schema, SchemaIssue, SchemaTransformation } from "effect"
import {
  HttpApi,
  HttpApiEndpoint,
  HttpApiGroup,
  HttpApiMiddleware,
  HttpApiSchema,
  HttpApiSecurity
} from "effect/http-api"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import { Tensor } from "../core/Tensor.js"
import * as Values from "../backends/Values.js"
import type * as Loaded from "../models/Loaded.js"

/**
 * The protocol version, sent by clients and reported by `/v1/health`.
 *
 * @since 0.1.0
 */
export const version = "1"

// ---------------------------------------------------------------------------
// The binary tensor container (safetensors layout)
// ---------------------------------------------------------------------------

const codes = {
  float32: "F32",
  float64: "F64",
  float16: "F16",
  int8: "I8",
  int16: "I16",
  int32: "I32",
  int64: "I64",
  uint8: "U8",
  uint16: "U16",
  uint32: "U32",
  uint64: "U64",
  bool: "BOOL"
} as const satisfies Record<Exclude<DType.DType, "string">, string>

const fromCode = new Map<string, Exclude<DType.DType, "string">>(
  Object.entries(codes).map(([k, v]) => [v, k as Exclude<DType.DType, "string">])
)

const littleEndian = os.endianness() === "LE"

const STRINGS = "nnsight.strings"

/**
 * Why a tensor container could not be read.
 *
 * @since 0.1.0
 */
export class ContainerError extends Error {
  override readonly name = "ContainerError"
}

/**
 * Writes tensors (and string metadata) as one safetensors container.
 *
 * @example
 * const bytes = Protocol.encodeTensors({ x: Tensor.from([1, 2]) })
 *
 * @since 0.1.0
 */
export const encodeTensors = (
  tensors: Readonly<Record<string, Tensor>>,
  metadata: Readonly<Record<string, string>> = {}
): Uint8Array => {
  if (!littleEndian) throw new ContainerError("nnsight-ts remote execution needs a little-endian machine")
  const header: Record<string, unknown> = {}
  const strings: Record<string, { shape: ReadonlyArray<number>; data: ReadonlyArray<string> }> = {}
  const parts: Array<Uint8Array> = []
  let offset = 0
  for (const [name, t] of Object.entries(tensors)) {
    if (name === "__metadata__") throw new ContainerError(`"__metadata__" cannot name a tensor`)
    if (t.dtype === "string") {
      strings[name] = { shape: t.shape, data: t.data as ReadonlyArray<string> }
      continue
    }
    const data = t.data as Exclude<DType.TypedData, Array<string>>
    const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
    header[name] = { dtype: codes[t.dtype], shape: [...t.shape], data_offsets: [offset, offset + bytes.byteLength] }
    parts.push(bytes)
    offset += bytes.byteLength
  }
  const meta: Record<string, string> = { ...metadata }
  if (Object.keys(strings).length > 0) meta[STRINGS] = JSON.stringify(strings)
  if (Object.keys(meta).length > 0) header.__metadata__ = meta
  let json = Buffer.from(JSON.stringify(header), "utf8")
  // pad the header with spaces so the data starts 8-byte aligned
  const pad = (8 - (json.byteLength % 8)) % 8
  if (pad > 0) json = Buffer.concat([json, Buffer.alloc(pad, 0x20)])
  const out = new Uint8Array(8 + json.byteLength + offset)
  new DataView(out.buffer).setBigUint64(0, BigInt(json.byteLength), true)
  out.set(json, 8)
  let at = 8 + json.byteLength
  for (const p of parts) {
    out.set(p, at)
    at += p.byteLength
  }
  return out
}

/**
 * Limits on what {@link decodeTensors} accepts.
 *
 * @since 0.1.0
 */
export interface ContainerLimits {
  /** Most tensors in one container (default 4096). */
  readonly maxTensors?: number
  /** Most bytes of the JSON header (default 64 MiB). */
  readonly maxHeaderBytes?: number
}

const isIntArray = (u: unknown): u is Array<number> =>
  Array.isArray(u) && u.every((d) => typeof d === "number" && Number.isSafeInteger(d) && d >= 0)

/**
 * Reads a safetensors container, checking every offset, dtype and shape;
 * the bytes are copied into fresh, aligned typed arrays. Throws
 * {@link ContainerError} on anything malformed.
 *
 * @example
 * const { tensors, metadata } = Protocol.decodeTensors(bytes)
 *
 * @since 0.1.0
 */
export const decodeTensors = (
  bytes: Uint8Array,
  limits: ContainerLimits = {}
): { readonly tensors: Record<string, Tensor>; readonly metadata: Record<string, string> } => {
  if (!littleEndian) throw new ContainerError("nnsight-ts remote execution needs a little-endian machine")
  if (bytes.byteLength < 8) throw new ContainerError("the body is too short to be a tensor container")
  const n = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getBigUint64(0, true)
  const maxHeader = limits.maxHeaderBytes ?? 64 * 1024 * 1024
  if (n > BigInt(bytes.byteLength - 8) || n > BigInt(maxHeader)) {
    throw new ContainerError(`the container header length (${n}) is larger than the body or the limit`)
  }
  const headerEnd = 8 + Number(n)
  let header: unknown
  try {
    header = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset + 8, Number(n)).toString("utf8"))
  } catch (e) {
    throw new ContainerError(`the container header is not valid JSON: ${e instanceof Error ? e.message : String(e)}`)
  }
  if (header === null || typeof header !== "object" || Array.isArray(header)) {
    throw new ContainerError("the container header must be a JSON object")
  }
  const dataLength = bytes.byteLength - headerEnd
  const tensors: Record<string, Tensor> = {}
  const metadata: Record<string, string> = {}
  const entries = Object.entries(header as Record<string, unknown>)
  if (entries.length > (limits.maxTensors ?? 4096) + 1) throw new ContainerError(`the container holds too many tensors (${entries.length})`)
  for (const [name, entry] of entries) {
    if (name === "__metadata__") {
      if (entry === null || typeof entry !== "object" || Array.isArray(entry)) throw new ContainerError("__metadata__ must be an object")
      for (const [k, v] of Object.entries(entry as Record<string, unknown>)) {
        if (typeof v !== "string") throw new ContainerError(`__metadata__.${k} must be a string`)
        metadata[k] = v
      }
      continue
    }
    const e = entry as { dtype?: unknown; shape?: unknown; data_offsets?: unknown }
    if (e === null || typeof e !== "object") throw new ContainerError(`tensor "${name}": its entry must be an object`)
    const dtype = typeof e.dtype === "string" ? fromCode.get(e.dtype) : undefined
    if (dtype === undefined) throw new ContainerError(`tensor "${name}": unknown dtype ${JSON.stringify(e.dtype)}`)
    if (!isIntArray(e.shape) || e.shape.length > 16) throw new ContainerError(`tensor "${name}": shape must be a list of at most 16 non-negative integers`)
    if (!isIntArray(e.data_offsets) || e.data_offsets.length !== 2) throw new ContainerError(`tensor "${name}": data_offsets must be [begin, end]`)
    const [begin, end] = e.data_offsets
    const size = e.shape.reduce((a, b) => a * b, 1)
    const itemSize = DType.byteSize(dtype)
    if (!Number.isSafeInteger(size * itemSize) || begin > end || end > dataLength || end - begin !== size * itemSize) {
      throw new ContainerError(`tensor "${name}": data_offsets [${begin}, ${end}] do not fit its shape [${e.shape}] and dtype ${e.dtype} in a body of ${dataLength} data bytes`)
    }
    const out = DType.arrayFor(dtype, size) as Exclude<DType.TypedData, Array<string>>
    new Uint8Array(out.buffer).set(bytes.subarray(headerEnd + begin, headerEnd + end))
    tensors[name] = new Tensor(dtype, e.shape, out as DType.ArrayOf[typeof dtype])
  }
  const strings = metadata[STRINGS]
  if (strings !== undefined) {
    delete metadata[STRINGS]
    let parsed: unknown
    try {
      parsed = JSON.parse(strings)
    } catch {
      throw new ContainerError("string tensors are not valid JSON")
    }
    for (const [name, s] of Object.entries(parsed as Record<string, { shape?: unknown; data?: unknown }>)) {
      if (!isIntArray(s?.shape) || !Array.isArray(s.data) || !s.data.every((x) => typeof x === "string")) {
        throw new ContainerError(`string tensor "${name}" is malformed`)
      }
      try {
        tensors[name] = new Tensor("string", s.shape, [...(s.data as Array<string>)])
      } catch (err) {
        throw new ContainerError(`string tensor "${name}": ${err instanceof Error ? err.message : String(err)}`)
      }
    }
  }
  return { tensors, metadata }
}

/**
 * A `Tensor` value in a Schema (it is its own encoded form; containers
 * carry the bytes).
 *
 * @since 0.1.0
 */
export const TensorSchema = Schema.declare((u): u is Tensor => u instanceof Tensor, {
  identifier: "Tensor",
  expected: "a Tensor"
})

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

const NonNegativeInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(0))
const PositiveInt = Schema.Int.check(Schema.isGreaterThanOrEqualTo(1))

/**
 * Rows of the batch that belong to one invoke.
 *
 * @since 0.1.0
 */
export const Rows = Schema.Struct({ start: NonNegativeInt, count: PositiveInt })

/**
 * One invoke's prompt for a language model, tokenized on the server: a
 * text, texts (one row each), token ids, or rows of token ids.
 *
 * @since 0.1.0
 */
export const Prompt = Schema.Union([
  Schema.String,
  Schema.Array(Schema.String),
  Schema.Array(NonNegativeInt),
  Schema.Array(Schema.Array(NonNegativeInt))
])

/**
 * @since 0.1.0
 */
export type Prompt = typeof Prompt.Type

/**
 * What the model runs on: the batched feeds (in the container) with each
 * invoke's rows, or prompts the server tokenizes and batches.
 *
 * @since 0.1.0
 */
export const Inputs = Schema.Union([
  Schema.TaggedStruct("Feeds", { rows: Schema.Array(Rows) }),
  Schema.TaggedStruct("Prompts", { prompts: Schema.Array(Prompt) })
])

/**
 * @since 0.1.0
 */
export type Inputs = typeof Inputs.Type

/**
 * Generation options that cross the wire (`Generate.Options` without the
 * `onToken` callback: tokens stream as `Token` events instead).
 *
 * @since 0.1.0
 */
export const GenerateOptions = Schema.Struct({
  maxNewTokens: PositiveInt,
  doSample: Schema.optional(Schema.Boolean),
  temperature: Schema.optional(Schema.Finite),
  topK: Schema.optional(NonNegativeInt),
  topP: Schema.optional(Schema.Finite),
  seed: Schema.optional(Schema.Int),
  eosTokenId: Schema.optional(Schema.Union([NonNegativeInt, Schema.Array(NonNegativeInt)])),
  padTokenId: Schema.optional(NonNegativeInt),
  useCache: Schema.optional(Schema.Boolean)
})

/**
 * @since 0.1.0
 */
export type GenerateOptions = typeof GenerateOptions.Type

/**
 * What a job runs: a trace (one forward pass), a generation, or a session
 * (a graph of traces, loops and conditions, whose inputs are in the graph).
 *
 * @since 0.1.0
 */
export const JobKind = Schema.Literals(["trace", "generate", "session"])

/**
 * @since 0.1.0
 */
export type JobKind = typeof JobKind.Type

/**
 * The JSON part of a submission.
 *
 * @since 0.1.0
 */
export const JobRequest = Schema.Struct({
  model: Schema.String.check(Schema.isMaxLength(256)),
  kind: JobKind,
  graph: Graph.Graph,
  inputs: Inputs,
  generate: Schema.optional(GenerateOptions),
  /** Opt out of co-batching with other users' requests. */
  isolated: Schema.optional(Schema.Boolean),
  client: Schema.optional(Schema.String.check(Schema.isMaxLength(128)))
})

/**
 * @since 0.1.0
 */
export type JobRequest = typeof JobRequest.Type

/**
 * A decoded submission: the request and the batched model inputs.
 *
 * @since 0.1.0
 */
export const Submission = Schema.Struct({
  request: JobRequest,
  feeds: Schema.Record(Schema.String, TensorSchema)
})

/**
 * @since 0.1.0
 */
export type Submission = typeof Submission.Type

const issue = (message: string) => new SchemaIssue.InvalidValue({ message })

const decodeSubmission = Schema.decodeUnknownEffect(Submission)
const encodeSubmission = Schema.encodeEffect(Submission)

// Requests decoded lately, by their JSON text: a client that runs one experiment
// over many inputs sends the same text again, and decoding a graph strictly
// costs a server more than the rest of admitting it. Decoded requests are
// immutable, so jobs may share one.
const decodedRequests = new Map<string, JobRequest>()
const rememberRequest = (text: string, request: JobRequest) => {
  if (decodedRequests.size >= 256) decodedRequests.delete(decodedRequests.keys().next().value!)
  decodedRequests.set(text, request)
}

/**
 * The request body of `POST /v1/jobs`: a tensor container whose metadata
 * `request` is the JSON request, decoded strictly (`onExcessProperty:
 * "error"`) the first time its text is seen.
 *
 * @since 0.1.0
 */
export const SubmissionBody = Schema.Uint8Array.pipe(
  Schema.decodeTo(
    Schema.declare((u): u is Submission => typeof u === "object" && u !== null && "request" in u && "feeds" in u, {
      identifier: "Submission",
      expected: "a decoded submission"
    }),
    SchemaTransformation.transformEffect({
      decode: (bytes: Uint8Array) => {
        let decoded: ReturnType<typeof decodeTensors>
        try {
          decoded = decodeTensors(bytes)
        } catch (e) {
          return Effect.fail(issue(e instanceof Error ? e.message : String(e)))
        }
        const text = decoded.metadata.request
        if (text === undefined) return Effect.fail(issue("the container has no request in its __metadata__"))
        // the feeds are the container's own tensors: only the request needs decoding
        const known = decodedRequests.get(text)
        if (known !== undefined) return Effect.succeed<Submission>({ request: known, feeds: decoded.tensors })
        let request: unknown
        try {
          request = JSON.parse(text)
        } catch (e) {
          return Effect.fail(issue(`the request is not valid JSON: ${e instanceof Error ? e.message : String(e)}`))
        }
        return decodeSubmission({ request, feeds: decoded.tensors }, { onExcessProperty: "error" }).pipe(
          Effect.tap((s) => Effect.sync(() => rememberRequest(text, s.request))),
          Effect.mapError((e) => e.issue)
        )
      },
      encode: (s: Submission) =>
        encodeSubmission(s).pipe(
          Effect.mapError((e) => e.issue),
          Effect.flatMap((encoded) => {
            try {
              return Effect.succeed(encodeTensors(s.feeds as Record<string, Tensor>, { request: JSON.stringify(encoded.request) }))
            } catch (e) {
              return Effect.fail(issue(e instanceof Error ? e.message : String(e)))
            }
          })
        )
    })
  ),
  HttpApiSchema.asUint8Array({ contentType: "application/octet-stream" })
)

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/**
 * A missing, unknown or revoked API key (401).
 *
 * @since 0.1.0
 */
export class Unauthorized extends Schema.TaggedError<Unauthorized>()(
  "Unauthorized",
  { reason: Schema.String },
  { httpApiStatus: 401 }
) {
  override get message(): string {
    return `unauthorized: ${this.reason}`
  }
}

/**
 * A request that does not decode: malformed container or JSON, a field of
 * the wrong type, an unknown operation, an inconsistent graph (400).
 *
 * @since 0.1.0
 */
export class BadRequest extends Schema.TaggedError<BadRequest>()(
  "BadRequest",
  { reason: Schema.String, issues: Schema.Array(Schema.String) },
  { httpApiStatus: 400 }
) {
  override get message(): string {
    return `bad request: ${this.reason}${this.issues.length === 0 ? "" : `\n${this.issues.join("\n")}`}`
  }
}

/**
 * A model key the server does not host (404).
 *
 * @since 0.1.0
 */
export class UnknownModel extends Schema.TaggedError<UnknownModel>()(
  "UnknownModel",
  { model: Schema.String, available: Schema.Array(Schema.String) },
  { httpApiStatus: 404 }
) {
  override get message(): string {
    return `the server hosts no model "${this.model}"; it hosts: ${this.available.join(", ")}`
  }
}

/**
 * A job id that does not exist, or belongs to another key (404).
 *
 * @since 0.1.0
 */
export class JobNotFound extends Schema.TaggedError<JobNotFound>()(
  "JobNotFound",
  { id: Schema.String },
  { httpApiStatus: 404 }
) {
  override get message(): string {
    return `no job ${this.id}`
  }
}

/**
 * A request body over the server's size limit (413).
 *
 * @since 0.1.0
 */
export class PayloadTooLarge extends Schema.TaggedError<PayloadTooLarge>()(
  "PayloadTooLarge",
  { size: Schema.Number, limit: Schema.Number },
  { httpApiStatus: 413 }
) {
  override get message(): string {
    return `the request body has ${this.size} bytes; the limit is ${this.limit}`
  }
}

/**
 * The per-key limits a request can exceed.
 *
 * @since 0.1.0
 */
export const LimitName = Schema.Literals(["graphNodes", "savedBytes", "valueBytes", "tokens", "wallTimeMs"])

/**
 * @since 0.1.0
 */
export type LimitName = typeof LimitName.Type

/**
 * A request over one of its key's limits (422), or a run that went over
 * one (as a job error).
 *
 * @since 0.1.0
 */
export class LimitExceeded extends Schema.TaggedError<LimitExceeded>()(
  "LimitExceeded",
  { limit: LimitName, value: Schema.Number, max: Schema.Number },
  { httpApiStatus: 422 }
) {
  override get message(): string {
    return `the request exceeds its ${this.limit} limit: ${this.value} > ${this.max}`
  }
}

/**
 * Too many unfinished jobs for one key (429).
 *
 * @since 0.1.0
 */
export class TooManyJobs extends Schema.TaggedError<TooManyJobs>()(
  "TooManyJobs",
  { active: Schema.Number, max: Schema.Number },
  { httpApiStatus: 429 }
) {
  override get message(): string {
    return `this key has ${this.active} unfinished jobs; the limit is ${this.max}`
  }
}

/**
 * A graph that does not fit the model it names (a module, call, input or
 * output it does not have): the trace error a local run would raise (422).
 *
 * @since 0.1.0
 */
export class GraphRejected extends Schema.TaggedError<GraphRejected>()(
  "GraphRejected",
  { error: Errors.TraceError },
  { httpApiStatus: 422 }
) {
  override get message(): string {
    return this.error.message
  }
}

/**
 * A job that was cancelled before it finished.
 *
 * @since 0.1.0
 */
export class JobCancelled extends Schema.TaggedError<JobCancelled>()("JobCancelled", { id: Schema.String }) {
  override get message(): string {
    return `job ${this.id} was cancelled`
  }
}

/**
 * An unexpected failure of the server while running a job (never the
 * user's values or another user's data).
 *
 * @since 0.1.0
 */
export class InternalError extends Schema.TaggedError<InternalError>()("InternalError", { reason: Schema.String }) {
  override get message(): string {
    return `internal server error: ${this.reason}`
  }
}

/**
 * Why a job failed: the trace error of the run (with the user's line), a
 * limit it went over, cancellation, or an internal error.
 *
 * @since 0.1.0
 */
export const JobError = Schema.Union([
  Errors.UnknownModule,
  Errors.ModuleIndexOutOfRange,
  Errors.Unavailable,
  Errors.InvalidValue,
  Errors.OutOfOrder,
  Errors.InvalidInput,
  Errors.ExecutionError,
  LimitExceeded,
  JobCancelled,
  InternalError
])

/**
 * @since 0.1.0
 */
export type JobError = typeof JobError.Type

/**
 * The result of a job that has not finished (409).
 *
 * @since 0.1.0
 */
export class NotReady extends Schema.TaggedError<NotReady>()(
  "NotReady",
  { id: Schema.String, state: Schema.String },
  { httpApiStatus: 409 }
) {
  override get message(): string {
    return `job ${this.id} is ${this.state}; its result is not ready`
  }
}

/**
 * The result of a job that failed: its error (422).
 *
 * @since 0.1.0
 */
export class JobFailed extends Schema.TaggedError<JobFailed>()(
  "JobFailed",
  { id: Schema.String, error: JobError },
  { httpApiStatus: 422 }
) {
  override get message(): string {
    return this.error.message
  }
}

// ---------------------------------------------------------------------------
// Statuses, events, results
// ---------------------------------------------------------------------------

/**
 * Where a job is.
 *
 * @since 0.1.0
 */
export const JobState = Schema.Literals(["queued", "running", "completed", "failed", "cancelled"])

/**
 * @since 0.1.0
 */
export type JobState = typeof JobState.Type

/**
 * A job's status.
 *
 * @since 0.1.0
 */
export const JobStatus = Schema.Struct({
  id: Schema.String,
  model: Schema.String,
  kind: JobKind,
  state: JobState,
  /** Jobs ahead of it in its model's queue (while queued). */
  position: Schema.optional(Schema.Number),
  /** How many jobs shared its forward pass (co-batching), itself included. */
  batchedWith: Schema.optional(Schema.Number),
  error: Schema.optional(JobError),
  submittedAt: Schema.Number,
  startedAt: Schema.optional(Schema.Number),
  finishedAt: Schema.optional(Schema.Number)
})

/**
 * @since 0.1.0
 */
export type JobStatus = typeof JobStatus.Type

/**
 * One event of a job's life, streamed over Server-Sent Events.
 *
 * @since 0.1.0
 */
export const JobEvent = Schema.Union([
  Schema.TaggedStruct("Received", { id: Schema.String, model: Schema.String }),
  Schema.TaggedStruct("Queued", { position: Schema.Number }),
  Schema.TaggedStruct("Running", { batchedWith: Schema.Number }),
  Schema.TaggedStruct("Log", { message: Schema.String }),
  Schema.TaggedStruct("Token", { step: Schema.Number, tokens: Schema.Array(Schema.Number), finished: Schema.Array(Schema.Boolean) }),
  Schema.TaggedStruct("Completed", { elapsedMs: Schema.Number, resultBytes: Schema.Number }),
  Schema.TaggedStruct("Failed", { error: JobError })
])

/**
 * @since 0.1.0
 */
export type JobEvent = typeof JobEvent.Type

/**
 * Whether an event ends the job's stream.
 *
 * @since 0.1.0
 */
export const isTerminal = (e: JobEvent): boolean => e._tag === "Completed" || e._tag === "Failed"

/**
 * A value of a run (a tensor, a tuple of tensors, a number, a boolean, a JSON
 * value, a list or a dictionary: `Values.Val`).
 *
 * @since 0.1.0
 */
export const ValueSchema = Schema.declare((u): u is Values.Val => u !== undefined && u !== null, {
  identifier: "Value",
  expected: "a value"
})

/**
 * A job's result: saved values by node id, the values that are unavailable
 * with their error, and the token ids of a generation.
 *
 * @since 0.1.0
 */
export const JobResult = Schema.Struct({
  values: Schema.Array(Schema.Struct({ id: Schema.Number, value: ValueSchema })),
  unavailable: Schema.Array(Schema.Struct({ id: Schema.Number, error: Errors.Unavailable })),
  tokens: Schema.optional(TensorSchema),
  /** The job's log lines, in order (given by `run`, which streams no events). */
  logs: Schema.optional(Schema.Array(Schema.String))
})

/**
 * @since 0.1.0
 */
export type JobResult = typeof JobResult.Type

/** A value as JSON, its tensors named into the container. */
type WireValue =
  | { readonly t: "tensor"; readonly n: string }
  | { readonly t: "tuple"; readonly n: ReadonlyArray<string> }
  | { readonly t: "num"; readonly v: number | string }
  | { readonly t: "bool"; readonly v: boolean }
  | { readonly t: "json"; readonly v: unknown }
  | { readonly t: "list"; readonly items: ReadonlyArray<WireValue> }
  | { readonly t: "dict"; readonly entries: ReadonlyArray<readonly [string, WireValue]> }

const toWire = (v: Values.Val, tensors: Record<string, Tensor>): WireValue => {
  const name = (t: Tensor) => {
    const n = `t${Object.keys(tensors).length}`
    tensors[n] = t
    return n
  }
  if (v instanceof Tensor) return { t: "tensor", n: name(v) }
  if (typeof v === "number") {
    return { t: "num", v: Number.isFinite(v) && !Object.is(v, -0) ? v : Object.is(v, -0) ? "-0" : String(v) }
  }
  if (typeof v === "boolean") return { t: "bool", v }
  if (v instanceof Values.Json) return { t: "json", v: v.value }
  if (v instanceof Values.List) return { t: "list", items: v.items.map((x) => toWire(x, tensors)) }
  if (v instanceof Values.Dict) return { t: "dict", entries: [...v.entries].map(([k, x]) => [k, toWire(x, tensors)] as const) }
  if (Array.isArray(v)) return { t: "tuple", n: (v as ReadonlyArray<Tensor>).map(name) }
  throw new ContainerError(`cannot send a value of type ${typeof v}`)
}

const fromWire = (w: WireValue, tensors: Readonly<Record<string, Tensor>>): Values.Val => {
  const tensor = (n: string) => {
    const t = tensors[n]
    if (t === undefined) throw new ContainerError(`the result refers to a missing tensor "${n}"`)
    return t
  }
  switch (w?.t) {
    case "tensor":
      return tensor(w.n)
    case "tuple":
      return w.n.map(tensor)
    case "num":
      return typeof w.v === "number" ? w.v : w.v === "-0" ? -0 : Number(w.v)
    case "bool":
      return w.v
    case "json":
      return new Values.Json(w.v)
    case "list":
      return new Values.List(w.items.map((x) => fromWire(x, tensors)))
    case "dict": {
      const d = new Values.Dict()
      for (const [k, x] of w.entries) d.entries.set(k, fromWire(x, tensors))
      return d
    }
    default:
      throw new ContainerError("the result holds a malformed value")
  }
}

/**
 * Bytes of the tensors a value holds.
 *
 * @since 0.1.0
 */
export const valueBytes = (v: Values.Val): number => {
  if (v instanceof Tensor) return v.dtype === "string" ? (v.data as ReadonlyArray<string>).reduce((a, s) => a + s.length, 0) : (v.data as ArrayBufferView).byteLength
  if (v instanceof Values.List) return v.items.reduce<number>((a, x) => a + valueBytes(x), 0)
  if (v instanceof Values.Dict) return [...v.entries.values()].reduce<number>((a, x) => a + valueBytes(x), 0)
  if (Array.isArray(v)) return (v as ReadonlyArray<Tensor>).reduce((a, x) => a + valueBytes(x), 0)
  if (v instanceof Values.Json) return JSON.stringify(v.value ?? null).length
  return 8
}

/**
 * Bytes of the tensors a result holds (its values and tokens).
 *
 * @example
 * Protocol.resultBytes({ values: [{ id: 1, value: Tensor.zeros([2]) }], unavailable: [] }) // 8
 *
 * @since 0.1.0
 */
export const resultBytes = (r: JobResult): number =>
  r.values.reduce((a, v) => a + valueBytes(v.value as Values.Val), 0) + (r.tokens === undefined ? 0 : valueBytes(r.tokens))

/**
 * The response body of `GET /v1/jobs/:id/result`: a tensor container (the
 * values' tensors, the tokens as `tokens`, the rest as JSON in
 * `__metadata__.result`).
 *
 * @since 0.1.0
 */
export const ResultBody = Schema.Uint8Array.pipe(
  Schema.decodeTo(
    JobResult,
    SchemaTransformation.transformEffect({
      decode: (bytes: Uint8Array) => {
        try {
          const { tensors, metadata } = decodeTensors(bytes, { maxTensors: 1 << 20 })
          const meta = JSON.parse(metadata.result ?? "{}") as {
            values?: ReadonlyArray<readonly [number, WireValue]>
            unavailable?: unknown
            logs?: unknown
          }
          const { tokens, ...rest } = tensors
          return Effect.succeed({
            values: (meta.values ?? []).map(([id, w]) => ({ id, value: fromWire(w, rest) })),
            unavailable: meta.unavailable ?? [],
            ...(tokens === undefined ? {} : { tokens }),
            ...(meta.logs === undefined ? {} : { logs: meta.logs })
          } as unknown as typeof JobResult.Encoded)
        } catch (e) {
          return Effect.fail(issue(`malformed result: ${e instanceof Error ? e.message : String(e)}`))
        }
      },
      encode: (r: typeof JobResult.Encoded) => {
        try {
          const tensors: Record<string, Tensor> = {}
          const values = r.values.map(({ id, value }) => [id, toWire(value as Values.Val, tensors)] as const)
          if (r.tokens !== undefined) tensors.tokens = r.tokens as Tensor
          return Effect.succeed(encodeTensors(tensors, { result: JSON.stringify({ values, unavailable: r.unavailable, ...(r.logs === undefined ? {} : { logs: r.logs }) }) }))
        } catch (e) {
          return Effect.fail(issue(e instanceof Error ? e.message : String(e)))
        }
      }
    })
  ),
  HttpApiSchema.asUint8Array({ contentType: "application/octet-stream" })
)

/**
 * Identifies a model's module tree (paths, calls, hook points, parameters)
 * and its inputs and outputs: graphs recorded against one model run on any
 * model with the same fingerprint.
 *
 * @example
 * Protocol.fingerprint(model.runtime.loaded) // "3f2a..."
 *
 * @since 0.1.0
 */
export const fingerprint = (loaded: Loaded.Loaded): string => {
  const hit = fingerprints.get(loaded)
  if (hit !== undefined) return hit
  const modules = [...loaded.tree.modules.values()]
    .map((m) => [m.path, m.calls.map((c) => [c.inputs.length, c.outputs.length]), m.parameters.map((p) => p.name)] as const)
    .sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0))
  const g = loaded.model.graph
  const text = JSON.stringify({
    modules,
    inputs: g.inputs.map((v) => v.name),
    outputs: g.outputs.map((v) => v.name)
  })
  const out = createHash("sha256").update(text).digest("hex").slice(0, 32)
  fingerprints.set(loaded, out)
  return out
}

const fingerprints = new WeakMap<Loaded.Loaded, string>()

/**
 * A model the server hosts. `fingerprint` identifies its module tree and
 * inputs: a client whose local model has the same one records graphs the
 * server can run.
 *
 * @since 0.1.0
 */
export const ModelInfo = Schema.Struct({
  key: Schema.String,
  fingerprint: Schema.String,
  kind: Schema.Literals(["language", "generic"]),
  inputs: Schema.Array(Schema.String)
})

/**
 * @since 0.1.0
 */
export type ModelInfo = typeof ModelInfo.Type

/**
 * Counters of a server (for monitoring and benchmarks).
 *
 * @since 0.1.0
 */
export const Stats = Schema.Struct({
  submitted: Schema.Number,
  completed: Schema.Number,
  failed: Schema.Number,
  rejected: Schema.Number,
  /** Forward passes (or generations) run. */
  runs: Schema.Number,
  /** Runs that served more than one job. */
  coBatchedRuns: Schema.Number,
  /** Jobs served by co-batched runs. */
  coBatchedJobs: Schema.Number,
  largestBatch: Schema.Number,
  queued: Schema.Number,
  running: Schema.Number
})

/**
 * @since 0.1.0
 */
export type Stats = typeof Stats.Type

// ---------------------------------------------------------------------------
// Middleware
// ---------------------------------------------------------------------------

/**
 * The per-key limits.
 *
 * @since 0.1.0
 */
export interface Limits {
  /** Unfinished (queued or running) jobs at once. */
  readonly concurrentJobs: number
  /** Nodes of one graph. */
  readonly graphNodes: number
  /** Bytes of the values one job saves. */
  readonly savedBytes: number
  /** Bytes of the largest value one job's graph computes (checked by shape inference before it runs). */
  readonly valueBytes: number
  /** Input tokens (elements of `input_ids`, else batch rows) plus generated tokens. */
  readonly tokens: number
  /** Wall time of one run. */
  readonly wallTimeMs: number
}

/**
 * The API key of the request being served (provided by {@link Authorization}).
 *
 * @since 0.1.0
 */
export class CurrentKey extends Context.Service<CurrentKey, { readonly id: string; readonly limits: Limits }>()(
  "nnsight-ts/remote/CurrentKey"
) {}

/**
 * Bearer-token authentication with API keys.
 *
 * @since 0.1.0
 */
export class Authorization extends HttpApiMiddleware.Service<Authorization, { provides: CurrentKey }>()(
  "nnsight-ts/remote/Authorization",
  { security: { bearer: HttpApiSecurity.bearer }, error: Unauthorized }
) {}

/**
 * Request guards: the body size limit (before the body is read) and typed
 * 400s for requests that do not decode.
 *
 * @since 0.1.0
 */
export class Guard extends HttpApiMiddleware.Service<Guard>()("nnsight-ts/remote/Guard", {
  error: [BadRequest, PayloadTooLarge]
}) {}

// ---------------------------------------------------------------------------
// The API
// ---------------------------------------------------------------------------

const JobId = { id: Schema.String.check(Schema.isMaxLength(64)) }

/**
 * Health (no key needed).
 *
 * @since 0.1.0
 */
export class SystemGroup extends HttpApiGroup.make("system").add(
  HttpApiEndpoint.get("health", "/health", {
    success: Schema.Struct({ status: Schema.Literal("ok"), version: Schema.String, models: Schema.Array(Schema.String) })
  })
).prefix("/v1") {}

/**
 * Models, jobs and statistics (API key needed).
 *
 * @since 0.1.0
 */
export class JobsGroup extends HttpApiGroup.make("jobs")
  .add(
    HttpApiEndpoint.get("models", "/models", { success: Schema.Array(ModelInfo) }),
    HttpApiEndpoint.get("stats", "/stats", { success: Stats }),
    HttpApiEndpoint.post("submit", "/jobs", {
      payload: SubmissionBody,
      success: JobStatus.pipe(HttpApiSchema.status(202)),
      error: [UnknownModel, LimitExceeded, TooManyJobs, GraphRejected, BadRequest]
    }),
    // submit, wait and download in one round trip: what a blocking call needs when it follows no events
    HttpApiEndpoint.post("run", "/jobs/run", {
      payload: SubmissionBody,
      success: ResultBody,
      error: [UnknownModel, LimitExceeded, TooManyJobs, GraphRejected, BadRequest, JobFailed]
    }),
    HttpApiEndpoint.get("status", "/jobs/:id", { params: JobId, success: JobStatus, error: JobNotFound }),
    HttpApiEndpoint.get("events", "/jobs/:id/events", {
      params: JobId,
      success: HttpApiSchema.StreamSse({ data: JobEvent }),
      error: JobNotFound
    }),
    HttpApiEndpoint.get("result", "/jobs/:id/result", {
      params: JobId,
      success: ResultBody,
      error: [JobNotFound, NotReady, JobFailed]
    }),
    HttpApiEndpoint.delete("cancel", "/jobs/:id", { params: JobId, success: JobStatus, error: JobNotFound })
  )
  .middleware(Authorization)
  .prefix("/v1") {}

/**
 * The nnsight-ts remote API.
 *
 * @since 0.1.0
 */
export class Api extends HttpApi.make("nnsight-ts")
  .add(SystemGroup)
  .add(JobsGroup)
  .middleware(Guard)
  .annotate(HttpApi.ParseOptions, { onExcessProperty: "error" })
  .annotate(HttpApi.HeadersParseOptions, {}) {}
