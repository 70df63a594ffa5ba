/**
 * onnxruntime sessions of model segments, created on first use and cached by
 * the segment's identity (node range and outputs), so repeated traces of the
 * same structure create no new session. The cache is a scoped resource: every
 * session is released when its scope closes.
 *
 * @example
 * import * as Sessions from "./Sessions.js"
 * const program = Effect.scoped(Effect.gen(function*() {
 *   const cache = yield* Sessions.make({ executionProviders: ["cpu"] })
 *   const session = yield* cache.get("0:120", () => bytes)
 * }))
 *
 * @since 0.1.0
 */
import { Data, Effect, Scope } from "effect"
import * as ort from "onnxruntime-node"

/**
 * onnxruntime refused to create or run a session.
 *
 * @since 0.1.0
 */
export class OrtError extends Data.TaggedError("OrtError")<{
  readonly message: string
  readonly cause?: unknown
}> {}

/**
 * Options passed to every session.
 *
 * @since 0.1.0
 */
export interface Options {
  /** onnxruntime execution providers, e.g. `["cpu"]`, `["webgpu"]`, `["cuda", "cpu"]`. Default `["cpu"]`. */
  readonly executionProviders?: ReadonlyArray<string>
  /** Extra onnxruntime session options merged over the defaults. */
  readonly sessionOptions?: ort.InferenceSession.SessionOptions
}

/**
 * A cache of sessions.
 *
 * @since 0.1.0
 */
export interface Cache {
  /** The session for `key`, created from `bytes()` the first time. */
  readonly get: (key: string, bytes: () => Uint8Array) => Effect.Effect<ort.InferenceSession, OrtError>
  /** How many sessions were created since the cache was made. */
  readonly created: () => number
  /** How many sessions are open now. */
  readonly size: () => number
  /**
   * Runs `f` with the session for `key` (created from `bytes()` the first
   * time); while `f` runs, {@link Cache.drop} of the key waits for it.
   */
  readonly use: <A, E>(key: string, bytes: () => Uint8Array, f: (session: ort.InferenceSession) => Effect.Effect<A, E>) => Effect.Effect<A, E | OrtError>
  /** Releases the sessions of `keys` now, or when their last `use` ends. */
  readonly drop: (keys: Iterable<string>) => void
}

/**
 * Session options every segment gets: thread pools that do not spin, since
 * many sessions share the process (measured: spinning makes chained segments
 * cost 1.3x one whole-model session; without it they cost the same).
 *
 * @since 0.1.0
 */
export const sessionOptions = (options: Options = {}): ort.InferenceSession.SessionOptions => ({
  executionProviders: [...(options.executionProviders ?? ["cpu"])] as Array<ort.InferenceSession.ExecutionProviderConfig>,
  graphOptimizationLevel: "all",
  // onnxruntime warns when a segment's outputs are narrower than the model declared
  logSeverityLevel: 3,
  ...options.sessionOptions,
  extra: {
    ...(options.sessionOptions?.extra ?? {}),
    session: { "intra_op.allow_spinning": "0", ...(options.sessionOptions?.extra?.session ?? {}) }
  }
})

/**
 * Makes a session cache whose sessions are released when the scope closes.
 *
 * @example
 * const cache = yield* Sessions.make()
 *
 * @since 0.1.0
 */
export const make = (options: Options = {}): Effect.Effect<Cache, never, Scope.Scope> =>
  Effect.gen(function*() {
    const sessions = new Map<string, Promise<ort.InferenceSession>>()
    const users = new Map<Promise<ort.InferenceSession>, number>()
    const dropped = new Set<Promise<ort.InferenceSession>>()
    let created = 0
    const releaseLater = (p: Promise<ort.InferenceSession>) => {
      p.then((s) => s.release()).catch(() => undefined)
    }
    const opts = sessionOptions(options)
    yield* Effect.addFinalizer(() =>
      Effect.promise(async () => {
        const all = [...sessions.values()]
        sessions.clear()
        for (const p of all) {
          const s = await p.catch(() => undefined)
          await s?.release().catch(() => undefined)
        }
      })
    )
    const get = (key: string, bytes: () => Uint8Array) =>
      Effect.tryPromise({
        try: () => {
          let p = sessions.get(key)
          if (p === undefined) {
            created++
            p = ort.InferenceSession.create(bytes(), opts)
            sessions.set(key, p)
            // a failed creation must not poison the cache
            p.catch(() => sessions.delete(key))
          }
          return p
        },
        catch: (cause) => new OrtError({ message: `onnxruntime could not create a session: ${String(cause)}`, cause })
      })
    const use = <A, E>(key: string, bytes: () => Uint8Array, f: (session: ort.InferenceSession) => Effect.Effect<A, E>) =>
      Effect.flatMap(get(key, bytes), (session) => {
        const p = sessions.get(key)
        if (p === undefined) return f(session)
        return Effect.acquireUseRelease(
          Effect.sync(() => users.set(p, (users.get(p) ?? 0) + 1)),
          () => f(session),
          () =>
            Effect.sync(() => {
              const left = (users.get(p) ?? 1) - 1
              if (left > 0) return users.set(p, left)
              users.delete(p)
              if (dropped.delete(p)) releaseLater(p)
            })
        )
      })
    const drop = (keys: Iterable<string>) => {
      for (const key of keys) {
        const p = sessions.get(key)
        if (p === undefined) continue
        sessions.delete(key)
        if ((users.get(p) ?? 0) > 0) dropped.add(p)
        else releaseLater(p)
      }
    }
    return { get, created: () => created, size: () => sessions.size, use, drop }
  })

/**
 * Runs a session on named feeds and fetches the named outputs.
 *
 * @example
 * const out = yield* Sessions.run(session, { x }, ["y"])
 *
 * @since 0.1.0
 */
export const run = (
  session: ort.InferenceSession,
  feeds: Record<string, ort.Tensor>,
  outputs: ReadonlyArray<string>
): Effect.Effect<Record<string, ort.Tensor>, OrtError> =>
  Effect.tryPromise({
    try: () => session.run(feeds, [...outputs]) as Promise<Record<string, ort.Tensor>>,
    catch: (cause) => new OrtError({ message: `onnxruntime run failed: ${String(cause)}`, cause })
  })
