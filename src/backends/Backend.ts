/**
 * The service every interpreter sits behind. A trace builds a request (the
 * graph, the batched inputs, each invoke's rows) and hands it to the
 * `Backend` in context; the local interpreter is the default. A test can plug
 * in one that records graphs; the remote client is another.
 *
 * @example
 * import { Backend } from "nnsight-ts"
 * const recording = Layer.succeed(Backend, Backend.of({
 *   execute: (req) => Effect.sync(() => { seen.push(req.graph); return { values: new Map(), unavailable: new Map() } })
 * }))
 * await Effect.runPromise(model.effect.trace(x, fn).pipe(Effect.provide(recording)))
 *
 * @since 0.1.0
 */
import { Context, Effect, Layer } from "effect"
import type * as Errors from "../core/Errors.js"
import * as Local from "./Local.js"

/**
 * One execution request.
 *
 * @since 0.1.0
 */
export interface Request extends Local.Request {
  /** The model, as loaded locally (remote backends use only its identity). */
  readonly runtime: Local.Runtime
}

/**
 * What a backend implements.
 *
 * @since 0.1.0
 */
export interface Service {
  readonly execute: (request: Request) => Effect.Effect<Local.Outcome, Errors.TraceError>
}

/**
 * The backend in context.
 *
 * @since 0.1.0
 */
export class Backend extends Context.Service<Backend, Service>()("nnsight-ts/Backend") {
  /**
   * The local onnxruntime interpreter.
   *
   * @since 0.1.0
   */
  static readonly local: Service = { execute: (request) => Local.execute(request.runtime, request) }

  /**
   * A layer providing the local interpreter.
   *
   * @since 0.1.0
   */
  static readonly layer: Layer.Layer<Backend> = Layer.succeed(Backend, Backend.local)
}
