/**
 * Hugging Face hub loader: downloads the files a {@link LanguageModel} needs
 * from a model repository (`config.json`, `generation_config.json`,
 * `tokenizer.json`, `tokenizer_config.json`, the ONNX file and its external
 * data) into a local cache, and returns the folder to load.
 *
 * - Cache layout: `<cacheDir>/<org>/<name>/<revision>/<path in the repo>`
 *   (transformers.js style, one folder per revision).
 * - Cached complete files are reused without any network request; optional
 *   files the hub does not have are remembered (`.nnsight-hub.json`), so a
 *   second call on a complete cache makes no request at all.
 * - Files download to `<path>.incomplete`, streamed to disk, and are renamed
 *   when complete; an interrupted download resumes with an HTTP `Range`
 *   request (in the same call, and in a later call).
 * - Sizes are checked against `Content-Length` / `Content-Range`, and files
 *   whose `X-Linked-Etag` / `ETag` is a sha256 (the hub's LFS files) are
 *   hashed: a mismatch deletes the file and fails with {@link CorruptFile}.
 * - `Authorization: Bearer <token>` for gated and private repos (never sent to
 *   another origin a redirect points to, such as the hub's CDN).
 * - Offline mode (`offline: true` or `HF_HUB_OFFLINE=1`) uses the cache only.
 *
 * @example
 * import { Hub, LanguageModel } from "nnsight-ts"
 * const dir = await Hub.downloadPromise("onnx-community/gpt2", { variant: "quantized" })
 * const model = await LanguageModel.load(dir, { variant: "quantized" })
 *
 * @since 0.1.0
 */
import { createHash } from "node:crypto"
import { createReadStream, createWriteStream } from "node:fs"
import * as fs from "node:fs/promises"
import * as os from "node:os"
import * as path from "node:path"
import { Readable, Transform } from "node:stream"
import { pipeline } from "node:stream/promises"
import type { ReadableStream as NodeReadableStream } from "node:stream/web"
import { Cause, Effect, Exit, Schema } from "effect"

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/**
 * The repository (or its revision) does not exist on the hub, or is private
 * and no accepted token was sent.
 *
 * @since 0.1.0
 */
export class RepoNotFound extends Schema.TaggedError<RepoNotFound>()("RepoNotFound", {
  repoId: Schema.String,
  revision: Schema.String,
  url: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `Hugging Face repository "${this.repoId}" (revision "${this.revision}") was not found: ${this.reason} (${this.url}). Check the id and revision; if the repository is private, pass a token (options.token or HF_TOKEN).`
  }
}

/**
 * A file the model needs is not in the repository.
 *
 * @since 0.1.0
 */
export class FileNotFound extends Schema.TaggedError<FileNotFound>()("FileNotFound", {
  repoId: Schema.String,
  revision: Schema.String,
  path: Schema.String,
  url: Schema.String
}) {
  override get message(): string {
    return `the Hugging Face repository "${this.repoId}" (revision "${this.revision}") has no file ${this.path} (${this.url})`
  }
}

/**
 * The hub refused the request (401/403): the repository is gated or private
 * and no token, or a token without access, was sent.
 *
 * @since 0.1.0
 */
export class Unauthorized extends Schema.TaggedError<Unauthorized>()("Unauthorized", {
  repoId: Schema.String,
  path: Schema.String,
  url: Schema.String,
  status: Schema.Number,
  tokenSent: Schema.Boolean,
  serverMessage: Schema.String
}) {
  override get message(): string {
    const server = this.serverMessage === "" ? "" : ` The hub said: ${this.serverMessage}`
    return this.tokenSent
      ? `the hub refused the token for "${this.repoId}" (HTTP ${this.status} on ${this.path}): the token has no access to this gated or private repository; accept its conditions on its page or use another token.${server}`
      : `"${this.repoId}" is gated or private (HTTP ${this.status} on ${this.path}): pass a Hugging Face token (options.token or the HF_TOKEN environment variable) of an account that has access.${server}`
  }
}

/**
 * The hub could not be reached, or the transfer failed: connection refused or
 * reset, a timeout, a server error. A partly downloaded file is kept as
 * `<file>.incomplete` and resumed by the next call.
 *
 * @since 0.1.0
 */
export class NetworkError extends Schema.TaggedError<NetworkError>()("NetworkError", {
  repoId: Schema.String,
  path: Schema.String,
  url: Schema.String,
  reason: Schema.String,
  status: Schema.NullOr(Schema.Number)
}) {
  override get message(): string {
    const status = this.status === null ? "" : ` (HTTP ${this.status})`
    return `downloading ${this.path} of "${this.repoId}" from ${this.url} failed${status}: ${this.reason}`
  }
}

/**
 * A downloaded file does not match what the hub announced (its size or its
 * sha256). The file is deleted, not left in the cache.
 *
 * @since 0.1.0
 */
export class CorruptFile extends Schema.TaggedError<CorruptFile>()("CorruptFile", {
  repoId: Schema.String,
  path: Schema.String,
  url: Schema.String,
  expected: Schema.String,
  actual: Schema.String
}) {
  override get message(): string {
    return `the download of ${this.path} of "${this.repoId}" from ${this.url} is corrupt: expected ${this.expected}, got ${this.actual}; the file was deleted, try again`
  }
}

/**
 * Offline mode, and a file the model needs is not in the cache.
 *
 * @since 0.1.0
 */
export class OfflineMissing extends Schema.TaggedError<OfflineMissing>()("OfflineMissing", {
  repoId: Schema.String,
  revision: Schema.String,
  path: Schema.String,
  cacheDir: Schema.String
}) {
  override get message(): string {
    return `offline mode (HF_HUB_OFFLINE or options.offline) and ${this.path} of "${this.repoId}" (revision "${this.revision}") is not in the cache ${this.cacheDir}: download it once online`
  }
}

/**
 * A repository id, revision or file path that is not valid.
 *
 * @since 0.1.0
 */
export class InvalidRequest extends Schema.TaggedError<InvalidRequest>()("InvalidRequest", {
  repoId: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `invalid hub request for "${this.repoId}": ${this.reason}`
  }
}

/**
 * The cache folder could not be written or read (permissions, disk full).
 *
 * @since 0.1.0
 */
export class CacheError extends Schema.TaggedError<CacheError>()("CacheError", {
  repoId: Schema.String,
  path: Schema.String,
  reason: Schema.String
}) {
  override get message(): string {
    return `the hub cache failed on ${this.path} of "${this.repoId}": ${this.reason}`
  }
}

/**
 * Any error of {@link download}.
 *
 * @since 0.1.0
 */
export type HubError =
  | RepoNotFound
  | FileNotFound
  | Unauthorized
  | NetworkError
  | CorruptFile
  | OfflineMissing
  | InvalidRequest
  | CacheError

const errorClasses = [RepoNotFound, FileNotFound, Unauthorized, NetworkError, CorruptFile, OfflineMissing, InvalidRequest, CacheError]

/**
 * Whether a value is one of the {@link HubError}s.
 *
 * @since 0.1.0
 */
export const isHubError = (e: unknown): e is HubError => errorClasses.some((c) => e instanceof c)

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

/**
 * Progress of one file's download.
 *
 * @since 0.1.0
 */
export interface Progress {
  readonly repoId: string
  readonly path: string
  /** Bytes on disk so far (a resumed download starts above 0). */
  readonly loaded: number
  /** The file's size, when the hub announced it. */
  readonly total: number | undefined
}

/**
 * Options of {@link download}.
 *
 * @since 0.1.0
 */
export interface Options {
  /** The hub. Default: `HF_ENDPOINT`, else `https://huggingface.co`. */
  readonly endpoint?: string
  /** The cache folder. Default: `NNSIGHT_CACHE`, else `$HF_HOME/nnsight-ts/hub`, else `~/.cache/nnsight-ts/hub`. */
  readonly cacheDir?: string
  /** A Hugging Face token for gated and private repositories. Default: `HF_TOKEN`; `false` sends none. */
  readonly token?: string | false
  /** A branch, tag or commit. Default: `"main"`. */
  readonly revision?: string
  /** Use the cache only. Default: `HF_HUB_OFFLINE` is `1`/`true`/`yes`/`on`. */
  readonly offline?: boolean
  /** Which ONNX file: `"default"` (`model.onnx`), `"quantized"`, `"fp16"` (`model_<variant>.onnx`), or a path in the repository ending in `.onnx`. */
  readonly variant?: "default" | "quantized" | "fp16" | (string & {})
  /** More files of the repository to download (each must exist). */
  readonly files?: ReadonlyArray<string>
  /** Fail a request that receives nothing for this long (ms). Default: 30 000. */
  readonly timeoutMs?: number
  /** How many times one call resumes a transfer that broke off after receiving data. Default: 3. */
  readonly retries?: number
  /** Called as bytes arrive. */
  readonly onProgress?: (progress: Progress) => void
  /** The fetch to use (default: the global one). */
  readonly fetch?: typeof globalThis.fetch
}

const MAX_REDIRECTS = 10
const MAX_DATA_SHARDS = 64
const MANIFEST = ".nnsight-hub.json"

const envFlag = (v: string | undefined) => v !== undefined && ["1", "true", "yes", "on"].includes(v.trim().toLowerCase())
const nonEmpty = (v: string | undefined) => (v === undefined || v.trim() === "" ? undefined : v.trim())

/**
 * The cache folder used when none is given.
 *
 * @since 0.1.0
 */
export const defaultCacheDir = (): string => {
  const own = nonEmpty(process.env.NNSIGHT_CACHE)
  if (own !== undefined) return own
  const hfHome = nonEmpty(process.env.HF_HOME)
  if (hfHome !== undefined) return path.join(hfHome, "nnsight-ts", "hub")
  const xdg = nonEmpty(process.env.XDG_CACHE_HOME)
  return path.join(xdg ?? path.join(os.homedir(), ".cache"), "nnsight-ts", "hub")
}

/**
 * The ONNX files tried for a variant, in order (as {@link LanguageModel.load} looks for them).
 *
 * @since 0.1.0
 */
export const onnxCandidates = (variant: string): ReadonlyArray<string> => {
  const suffix = variant === "default" ? "" : `_${variant}`
  return [`onnx/model${suffix}.onnx`, `onnx/decoder_model_merged${suffix}.onnx`, `model${suffix}.onnx`, `decoder_model_merged${suffix}.onnx`]
}

interface Context {
  readonly repoId: string
  readonly revision: string
  readonly endpoint: string
  readonly cacheDir: string
  /** The local model folder: `<cacheDir>/<repoId>/<revision>`. */
  readonly dir: string
  readonly token: string | undefined
  readonly offline: boolean
  readonly timeoutMs: number
  readonly retries: number
  readonly fetch: typeof globalThis.fetch
  readonly onProgress: ((p: Progress) => void) | undefined
}

const validRepoId = /^[A-Za-z0-9][A-Za-z0-9_.-]*(\/[A-Za-z0-9_.-]+)?$/

const checkPath = (p: string, what: string): string | undefined => {
  if (p === "" || p.startsWith("/") || p.includes("\\") || p.includes("\0")) return `${what} "${p}" is not a relative path`
  if (p.split("/").some((s) => s === "" || s === "." || s === "..")) return `${what} "${p}" has an empty, "." or ".." segment`
  return undefined
}

const makeContext = (repoId: string, options: Options): Effect.Effect<Context, InvalidRequest> =>
  Effect.suspend(() => {
    const revision = options.revision ?? "main"
    const invalid = (reason: string) => Effect.fail(new InvalidRequest({ repoId, reason }))
    if (!validRepoId.test(repoId) || repoId.length > 200 || repoId.split("/").some((s) => s === "." || s === ".." || s.includes(".."))) {
      return invalid(`a repository id is "name" or "org/name" (letters, digits, "-", "_", ".")`)
    }
    if (revision === "" || revision.includes("\0")) return invalid(`the revision "${revision}" is empty`)
    for (const f of options.files ?? []) {
      const bad = checkPath(f, "the file")
      if (bad !== undefined) return invalid(bad)
    }
    const variant = options.variant ?? "default"
    if (variant.endsWith(".onnx")) {
      const bad = checkPath(variant, "the variant")
      if (bad !== undefined) return invalid(bad)
    } else if (!/^[A-Za-z0-9_]+$/.test(variant)) return invalid(`the variant "${variant}" is not a name nor a path ending in .onnx`)
    const endpoint = (options.endpoint ?? nonEmpty(process.env.HF_ENDPOINT) ?? "https://huggingface.co").replace(/\/+$/, "")
    try {
      new URL(endpoint)
    } catch {
      return invalid(`the endpoint "${endpoint}" is not a URL`)
    }
    const cacheDir = path.resolve(options.cacheDir ?? defaultCacheDir())
    const token = options.token === false ? undefined : nonEmpty(options.token ?? process.env.HF_TOKEN ?? process.env.HUGGING_FACE_HUB_TOKEN)
    const fetchFn = options.fetch ?? globalThis.fetch
    return Effect.succeed<Context>({
      repoId,
      revision,
      endpoint,
      cacheDir,
      dir: path.join(cacheDir, ...repoId.split("/"), encodeURIComponent(revision)),
      token,
      offline: options.offline ?? envFlag(process.env.HF_HUB_OFFLINE),
      timeoutMs: Math.max(1, options.timeoutMs ?? 30_000),
      retries: Math.max(0, Math.floor(options.retries ?? 3)),
      fetch: fetchFn,
      onProgress: options.onProgress
    })
  })

/**
 * The URL of a file of a repository: `<endpoint>/<repoId>/resolve/<revision>/<path>`.
 *
 * @since 0.1.0
 */
export const fileUrl = (endpoint: string, repoId: string, revision: string, file: string): string =>
  `${endpoint.replace(/\/+$/, "")}/${repoId}/resolve/${encodeURIComponent(revision)}/${file.split("/").map(encodeURIComponent).join("/")}`

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

interface Reply {
  readonly status: number
  readonly headers: Headers
  readonly body: ReadableStream<Uint8Array> | null
  readonly url: string
  /** `X-Linked-Etag` / `X-Linked-Size` of the hub's answer, seen before a redirect to its CDN. */
  readonly linkedEtag: string | undefined
  readonly linkedSize: number | undefined
}

/** Why a fetch or a body stream failed, from its error and causes. */
const describe = (e: unknown): string => {
  const parts: Array<string> = []
  let cur: unknown = e
  for (let i = 0; i < 5 && cur !== undefined && cur !== null; i++) {
    const err = cur as { message?: unknown; code?: unknown; cause?: unknown }
    const msg = typeof err.message === "string" ? err.message : String(cur)
    const code = typeof err.code === "string" ? `${err.code}: ` : ""
    if (msg !== "" && !parts.includes(code + msg)) parts.push(code + msg)
    cur = err.cause
  }
  return parts.join(" <- ") || "unknown error"
}

/** An idle timer: aborts when nothing happened for `ms`; also follows an outer signal. */
class Watchdog {
  readonly controller = new AbortController()
  timedOut = false
  private timer: ReturnType<typeof setTimeout> | undefined
  private readonly onOuter = () => this.controller.abort(this.outer.reason)
  constructor(
    private readonly outer: AbortSignal,
    private readonly ms: number
  ) {
    if (outer.aborted) this.controller.abort(outer.reason)
    else outer.addEventListener("abort", this.onOuter, { once: true })
    this.arm()
  }
  arm(): void {
    if (this.timer !== undefined) clearTimeout(this.timer)
    this.timer = setTimeout(() => {
      this.timedOut = true
      this.controller.abort(new Error(`no data for ${this.ms} ms`))
    }, this.ms)
  }
  close(): void {
    if (this.timer !== undefined) clearTimeout(this.timer)
    this.outer.removeEventListener("abort", this.onOuter)
  }
}

const cancelBody = (r: { body: ReadableStream<Uint8Array> | null }) => {
  r.body?.cancel().catch(() => undefined)
}

const stripEtag = (v: string | null | undefined): string | undefined => {
  if (v === null || v === undefined) return undefined
  return v.trim().replace(/^W\//, "").replace(/^"|"$/g, "")
}

const isSha256 = (v: string | undefined): v is string => v !== undefined && /^[0-9a-fA-F]{64}$/.test(v)

/** A request that follows redirects itself, to keep the hub's linked ETag and to drop the token off-origin. */
const request = async (
  ctx: Context,
  file: string,
  method: "GET" | "HEAD",
  extra: Record<string, string>,
  dog: Watchdog
): Promise<Reply> => {
  let url = fileUrl(ctx.endpoint, ctx.repoId, ctx.revision, file)
  const origin = new URL(url).origin
  let linkedEtag: string | undefined
  let linkedSize: number | undefined
  for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
    const headers: Record<string, string> = { "user-agent": "nnsight-ts", ...extra }
    if (ctx.token !== undefined && new URL(url).origin === origin) headers.authorization = `Bearer ${ctx.token}`
    let res: Response
    try {
      res = await ctx.fetch(url, { method, headers, redirect: "manual", signal: dog.controller.signal })
    } catch (e) {
      throw new NetworkError({
        repoId: ctx.repoId,
        path: file,
        url,
        reason: dog.timedOut ? `timed out: no answer in ${ctx.timeoutMs} ms` : describe(e),
        status: null
      })
    }
    dog.arm()
    linkedEtag ??= stripEtag(res.headers.get("x-linked-etag"))
    if (linkedSize === undefined) {
      const s = res.headers.get("x-linked-size")
      if (s !== null && /^\d+$/.test(s.trim())) linkedSize = Number(s)
    }
    const location = res.headers.get("location")
    if (res.status >= 300 && res.status < 400 && location !== null) {
      cancelBody(res)
      url = new URL(location, url).toString()
      continue
    }
    return { status: res.status, headers: res.headers, body: res.body, url, linkedEtag, linkedSize }
  }
  throw new NetworkError({ repoId: ctx.repoId, path: file, url, reason: `more than ${MAX_REDIRECTS} redirects`, status: null })
}

/** Maps a refusal of the hub to its error, or `undefined` for a plain 404 (the file is absent). */
const refusal = (ctx: Context, file: string, reply: Reply): HubError | "absent" | undefined => {
  const code = reply.headers.get("x-error-code") ?? ""
  const serverMessage = reply.headers.get("x-error-message") ?? ""
  const url = fileUrl(ctx.endpoint, ctx.repoId, ctx.revision, file)
  if (code === "RepoNotFound" || code === "RevisionNotFound") {
    const reason =
      code === "RevisionNotFound" ? `the revision does not exist` : ctx.token === undefined ? `no such repository, or it is private` : `no such repository, or the token has no access`
    return new RepoNotFound({ repoId: ctx.repoId, revision: ctx.revision, url, reason: serverMessage === "" ? reason : `${reason} (${serverMessage})` })
  }
  if (code === "GatedRepo" || reply.status === 401 || reply.status === 403) {
    return new Unauthorized({ repoId: ctx.repoId, path: file, url, status: reply.status, tokenSent: ctx.token !== undefined, serverMessage })
  }
  if (code === "EntryNotFound" || reply.status === 404) return "absent"
  return undefined
}

const fsError = (ctx: Context, file: string) => (e: unknown) => new CacheError({ repoId: ctx.repoId, path: file, reason: describe(e) })

const fsTry = async <A>(ctx: Context, file: string, f: () => Promise<A>): Promise<A> => {
  try {
    return await f()
  } catch (e) {
    throw fsError(ctx, file)(e)
  }
}

const sizeOf = async (p: string): Promise<number | undefined> => {
  try {
    const s = await fs.stat(p)
    return s.isFile() ? s.size : undefined
  } catch {
    return undefined
  }
}

const sha256Of = (p: string): Promise<string> => {
  const h = createHash("sha256")
  return pipeline(createReadStream(p), h).then(() => h.digest("hex"))
}

type Fetched = "done" | "absent"

/**
 * Downloads one file into the cache (resuming its `.incomplete` part), checks
 * it and renames it into place. `"absent"` when the hub has no such file.
 */
const fetchFileAsync = async (ctx: Context, file: string, signal: AbortSignal): Promise<Fetched> => {
  const dest = path.join(ctx.dir, ...file.split("/"))
  const partial = `${dest}.incomplete`
  await fsTry(ctx, file, () => fs.mkdir(path.dirname(dest), { recursive: true }))
  // attempts: resumes after broken transfers, and restarts after a part the server cannot continue
  const maxAttempts = ctx.retries + 3
  let resumes = 0
  let lastError: NetworkError | undefined
  for (let attempt = 0; attempt < maxAttempts; attempt++) {
    const start = (await sizeOf(partial)) ?? 0
    const dog = new Watchdog(signal, ctx.timeoutMs)
    try {
      const reply = await request(ctx, file, "GET", start > 0 ? { range: `bytes=${start}-` } : {}, dog)
      const url = reply.url
      const net = (reason: string, status: number | null = null) => new NetworkError({ repoId: ctx.repoId, path: file, url, reason, status })
      const refused = reply.status >= 400 ? refusal(ctx, file, reply) : undefined
      if (refused !== undefined) {
        cancelBody(reply)
        if (refused === "absent") return "absent"
        throw refused
      }
      let total: number | undefined
      let flags: "w" | "a"
      if (reply.status === 416) {
        // the part is already as long as the file (or longer): check it, or start over
        cancelBody(reply)
        const m = /\*\/(\d+)/.exec(reply.headers.get("content-range") ?? "")
        const size = m ? Number(m[1]) : reply.linkedSize
        if (size !== undefined && size === start) {
          await finish(ctx, file, partial, dest, url, size, etagOf(reply))
          return "done"
        }
        await fsTry(ctx, file, () => fs.rm(partial, { force: true }))
        continue
      } else if (reply.status === 206) {
        const m = /^bytes\s+(\d+)-(\d+)\/(\d+|\*)/.exec(reply.headers.get("content-range") ?? "")
        if (m === null || Number(m[1]) !== start) {
          // not the part asked for: start over
          cancelBody(reply)
          await fsTry(ctx, file, () => fs.rm(partial, { force: true }))
          continue
        }
        total = m[3] === "*" ? reply.linkedSize : Number(m[3])
        flags = "a"
      } else if (reply.status >= 200 && reply.status < 300) {
        const len = reply.headers.get("content-length")
        total = len !== null && /^\d+$/.test(len.trim()) ? Number(len) : reply.linkedSize
        flags = "w"
      } else {
        cancelBody(reply)
        throw net(`unexpected HTTP status ${reply.status}`, reply.status)
      }
      const offset = flags === "a" ? start : 0
      let received = 0
      let writeError: unknown
      if (reply.body !== null) {
        const counter = new Transform({
          transform(chunk: Buffer, _enc, cb) {
            received += chunk.length
            dog.arm()
            ctx.onProgress?.({ repoId: ctx.repoId, path: file, loaded: offset + received, total })
            cb(null, chunk)
          }
        })
        const out = createWriteStream(partial, { flags })
        out.on("error", (e) => {
          writeError = e
        })
        try {
          await pipeline(Readable.fromWeb(reply.body as unknown as NodeReadableStream<Uint8Array>), counter, out)
        } catch (e) {
          if (writeError !== undefined) throw fsError(ctx, file)(writeError)
          if (signal.aborted) throw e
          lastError = net(dog.timedOut ? `timed out: no data for ${ctx.timeoutMs} ms after ${offset + received} bytes` : `the transfer broke off after ${offset + received} bytes: ${describe(e)}`)
          if (received > 0 && resumes < ctx.retries) {
            resumes++
            continue
          }
          throw lastError
        }
      } else {
        await fsTry(ctx, file, () => fs.writeFile(partial, new Uint8Array(0), { flag: flags }))
      }
      const size = (await sizeOf(partial)) ?? 0
      if (total !== undefined && size < total) {
        lastError = net(`the server closed the transfer after ${size} of ${total} bytes`)
        if (received > 0 && resumes < ctx.retries) {
          resumes++
          continue
        }
        throw lastError
      }
      await finish(ctx, file, partial, dest, url, total, etagOf(reply))
      return "done"
    } finally {
      dog.close()
    }
  }
  throw (
    lastError ??
    new NetworkError({
      repoId: ctx.repoId,
      path: file,
      url: fileUrl(ctx.endpoint, ctx.repoId, ctx.revision, file),
      reason: `the server did not serve the file consistently in ${maxAttempts} attempts`,
      status: null
    })
  )
}

/** The sha256 the hub announced for a file: its linked ETag, else its ETag, when 64 hex digits. */
const etagOf = (reply: Reply): string | undefined => {
  if (isSha256(reply.linkedEtag)) return reply.linkedEtag.toLowerCase()
  const etag = stripEtag(reply.headers.get("etag"))
  return isSha256(etag) ? etag.toLowerCase() : undefined
}

/** Checks a complete `.incomplete` file (size, sha256) and renames it into place; deletes it if it is corrupt. */
const finish = async (
  ctx: Context,
  file: string,
  partial: string,
  dest: string,
  url: string,
  total: number | undefined,
  sha256: string | undefined
): Promise<void> => {
  const corrupt = async (expected: string, actual: string) => {
    await fs.rm(partial, { force: true }).catch(() => undefined)
    return new CorruptFile({ repoId: ctx.repoId, path: file, url, expected, actual })
  }
  const size = (await sizeOf(partial)) ?? 0
  if (total !== undefined && size !== total) throw await corrupt(`${total} bytes`, `${size} bytes`)
  if (sha256 !== undefined) {
    const actual = await fsTry(ctx, file, () => sha256Of(partial))
    if (actual !== sha256) throw await corrupt(`sha256 ${sha256}`, `sha256 ${actual}`)
  }
  await fsTry(ctx, file, () => fs.rename(partial, dest))
}

const fetchFile = (ctx: Context, file: string): Effect.Effect<Fetched, HubError> =>
  Effect.tryPromise({
    try: (signal) => fetchFileAsync(ctx, file, signal),
    catch: (e) =>
      isHubError(e)
        ? e
        : new NetworkError({ repoId: ctx.repoId, path: file, url: fileUrl(ctx.endpoint, ctx.repoId, ctx.revision, file), reason: describe(e), status: null })
  })

// ---------------------------------------------------------------------------
// download
// ---------------------------------------------------------------------------

interface Manifest {
  /** Files the hub answered 404 for (optional files and probes), so a cached call need not ask again. */
  readonly missing: ReadonlyArray<string>
}

const readManifest = (ctx: Context): Effect.Effect<Manifest> =>
  Effect.promise(async () => {
    try {
      const json = JSON.parse(await fs.readFile(path.join(ctx.dir, MANIFEST), "utf8")) as Partial<Manifest>
      return { missing: Array.isArray(json.missing) ? json.missing.filter((m): m is string => typeof m === "string") : [] }
    } catch {
      return { missing: [] }
    }
  })

const writeManifest = (ctx: Context, manifest: Manifest): Effect.Effect<void, CacheError> =>
  Effect.tryPromise({
    try: async () => {
      await fs.mkdir(ctx.dir, { recursive: true })
      const tmp = path.join(ctx.dir, `${MANIFEST}.${process.pid}.tmp`)
      await fs.writeFile(tmp, JSON.stringify({ repoId: ctx.repoId, revision: ctx.revision, ...manifest }, null, 2))
      await fs.rename(tmp, path.join(ctx.dir, MANIFEST))
    },
    catch: fsError(ctx, MANIFEST)
  })

const isCached = (ctx: Context, file: string): Effect.Effect<boolean> =>
  Effect.promise(() => sizeOf(path.join(ctx.dir, ...file.split("/"))).then((s) => s !== undefined))

type Need = "required" | "optional"

/**
 * Downloads the files of a model repository that {@link LanguageModel.load}
 * needs into the cache, and returns the local model folder
 * (`<cacheDir>/<repoId>/<revision>`). Files already in the cache are used
 * without a request; offline, only the cache is used.
 *
 * @example
 * import { Effect } from "effect"
 * import { Hub } from "nnsight-ts"
 * const dir = await Effect.runPromise(Hub.download("onnx-community/gpt2"))
 *
 * @since 0.1.0
 */
export const download = (repoId: string, options: Options = {}): Effect.Effect<string, HubError> =>
  Effect.gen(function* () {
    const ctx = yield* makeContext(repoId, options)
    const manifest = yield* readManifest(ctx)
    const missing = new Set(manifest.missing)
    const known = missing.size
    const url = (file: string) => fileUrl(ctx.endpoint, ctx.repoId, ctx.revision, file)

    /** Whether the file is (now) in the cache; a required file that cannot be had fails. */
    const get = (file: string, need: Need): Effect.Effect<boolean, HubError> =>
      Effect.gen(function* () {
        if (yield* isCached(ctx, file)) return true
        if (need === "optional" && missing.has(file)) return false
        if (ctx.offline) {
          if (need === "optional") return false
          return yield* Effect.fail(new OfflineMissing({ repoId: ctx.repoId, revision: ctx.revision, path: file, cacheDir: ctx.cacheDir }))
        }
        const got = yield* fetchFile(ctx, file)
        if (got === "done") {
          missing.delete(file)
          return true
        }
        if (need === "optional") {
          missing.add(file)
          return false
        }
        return yield* Effect.fail(
          file === "config.json"
            ? new RepoNotFound({ repoId: ctx.repoId, revision: ctx.revision, url: url(file), reason: "it has no config.json (no such repository, or not a model repository)" })
            : new FileNotFound({ repoId: ctx.repoId, revision: ctx.revision, path: file, url: url(file) })
        )
      })

    yield* get("config.json", "required")
    yield* get("generation_config.json", "optional")
    yield* get("tokenizer.json", "required")
    yield* get("tokenizer_config.json", "optional")

    const variant = options.variant ?? "default"
    let onnx: string | undefined
    if (variant.endsWith(".onnx")) {
      yield* get(variant, "required")
      onnx = variant
    } else {
      const candidates = onnxCandidates(variant)
      for (const c of candidates) {
        if (yield* get(c, "optional")) {
          onnx = c
          break
        }
      }
      if (onnx === undefined) {
        const tried = candidates.join(", ")
        return yield* Effect.fail(
          ctx.offline
            ? new OfflineMissing({ repoId: ctx.repoId, revision: ctx.revision, path: `an ONNX model (${tried})`, cacheDir: ctx.cacheDir })
            : new FileNotFound({ repoId: ctx.repoId, revision: ctx.revision, path: `an ONNX model (${tried})`, url: url(candidates[0]) })
        )
      }
    }
    // external data: <model>.onnx_data, then <model>.onnx_data_1, _2, ... for models over 2 GB
    if (yield* get(`${onnx}_data`, "optional")) {
      for (let i = 1; i < MAX_DATA_SHARDS; i++) {
        if (!(yield* get(`${onnx}_data_${i}`, "optional"))) break
      }
    }
    for (const f of options.files ?? []) yield* get(f, "required")

    const changed = missing.size !== known || manifest.missing.some((m) => !missing.has(m))
    if (changed && !ctx.offline) yield* writeManifest(ctx, { missing: [...missing].sort() })
    return ctx.dir
  })

/**
 * {@link download} as a Promise; rejects with the {@link HubError} itself.
 *
 * @example
 * const dir = await Hub.downloadPromise("onnx-community/gpt2", { token: process.env.HF_TOKEN })
 *
 * @since 0.1.0
 */
export const downloadPromise = (repoId: string, options: Options = {}): Promise<string> =>
  Effect.runPromiseExit(download(repoId, options)).then((exit) => {
    if (Exit.isSuccess(exit)) return exit.value
    throw Cause.squash(exit.cause)
  })

/**
 * The local folder {@link download} uses for a repository (it may not exist yet).
 *
 * @since 0.1.0
 */
export const cachePath = (repoId: string, options: Pick<Options, "cacheDir" | "revision"> = {}): string =>
  path.join(path.resolve(options.cacheDir ?? defaultCacheDir()), ...repoId.split("/"), encodeURIComponent(options.revision ?? "main"))
