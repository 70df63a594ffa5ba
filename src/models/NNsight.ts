/**
 * `NNsight`: any ONNX model, traced. Loads a model (path or bytes), recovers
 * its module tree, and runs traces whose interventions are interleaved with
 * the forward pass by the backend in use (local onnxruntime by default).
 *
 * @example
 * import { NNsight, Tensor } from "nnsight-ts"
 * const net = await NNsight.load("model.onnx")
 * const out = await net.trace({ x: Tensor.from([[1, 2, 3, 4, 5]]) }, (m) => ({ h: m.layer1.output }))
 * out.h.shape // [1, 10]
 * await net.close()
 *
 * @since 0.1.0
 */
import * as fs from "node:fs/promises"
import { Cause, Effect, Exit, Option, Scope } from "effect"
import * as DType from "../core/DType.js"
import * as Errors from "../core/Errors.js"
import * as Graph from "../core/Graph.js"
import { Tensor } from "../core/Tensor.js"
import * as Tracer from "../core/Tracer.js"
import { Backend } from "../backends/Backend.js"
import type * as Local from "../backends/Local.js"
import * as Values from "../backends/Values.js"
import * as Session from "../backends/Session.js"
import * as Scan from "../backends/Scan.js"
import * as Remote from "../remote/Client.js"
import * as Shapes from "./Shapes.js"
import * as Sessions from "../backends/Sessions.js"
import * as Loaded from "./Loaded.js"
import * as ModuleTree from "./ModuleTree.js"
import * as Onnx from "./Onnx.js"
import * as Weights from "./Weights.js"

/**
 * The inputs of a generic model: one tensor (for a one-input model) or
 * tensors by input name.
 *
 * @since 0.1.0
 */
export type Inputs = Tensor | Readonly<Record<string, Tensor>>

/**
 * Options of {@link NNsight.load}.
 *
 * @since 0.1.0
 */
export interface LoadOptions extends Loaded.Options, Sessions.Options {
  /** The backend traces run on unless one is provided in context (default: local). */
  readonly backend?: Backend["Service"]
}

/**
 * Options of one trace.
 *
 * @since 0.1.0
 */
export interface TraceOptions {
  /** Run on this backend instead of the model's. */
  readonly backend?: Backend["Service"]
  /** Run on an nnsight-ts server (`npx nnsight-ts serve`) instead. */
  readonly remote?: Remote.Options
}

/**
 * Batched model inputs and the rows of each invoke.
 *
 * @since 0.1.0
 */
export interface Batch {
  readonly feeds: Readonly<Record<string, Tensor>>
  readonly rows: ReadonlyArray<Local.Rows>
}

/**
 * What {@link TracedModel.scan} gives: proxies become their dtype and shape
 * (symbolic dimensions as strings), `.shape`s their dimensions.
 *
 * @since 0.1.0
 */
export type Scanned<R> = R extends Tracer.ShapeProxy
  ? ReadonlyArray<number | string>
  : R extends Tracer.TensorProxy
    ? { readonly dtype: string; readonly shape: ReadonlyArray<number | string> }
    : R extends ReadonlyArray<unknown>
      ? { readonly [K in keyof R]: Scanned<R[K]> }
      : R extends object
        ? { readonly [K in keyof R]: Scanned<R[K]> }
        : R

type TraceFn<I, R> = (m: Tracer.Envoy, t: Tracer.Context<I>) => R

/**
 * What every traced model does, whatever its inputs are (tensors for
 * {@link NNsight}, prompts for `LanguageModel`).
 *
 * @since 0.1.0
 */
export class TracedModel<I> {
  /** The Effect forms of the methods, with typed errors. */
  readonly effect: {
    /** {@link NNsight.trace} as an Effect. */
    readonly trace: {
      <R>(input: I, fn: TraceFn<I, R>, options?: TraceOptions): Effect.Effect<Tracer.Saved<R>, Errors.TraceError>
      <R>(fn: TraceFn<I, R>, options?: TraceOptions): Effect.Effect<Tracer.Saved<R>, Errors.TraceError>
    }
  }

  /** Interventions applied to every trace of this model (see {@link edit}). */
  protected edits: ReadonlyArray<(m: Tracer.Envoy) => void> = []
  /** Whether this object owns the sessions (edited copies share their original's). */
  private owner = true

  protected constructor(
    readonly runtime: Local.Runtime,
    private readonly scope: Scope.Closeable,
    private readonly backend: Backend["Service"]
  ) {
    this.effect = this.makeEffect()
  }

  protected makeEffect(): TracedModel<I>["effect"] {
    const self = this
    return {
      trace: ((a: unknown, b?: unknown, c?: unknown) => {
        const [input, fn, options, hasInput] =
          typeof a === "function" ? [undefined, a, b, false] : [a, b, c, true]
        return self.traceEffect(input as I, fn as TraceFn<I, unknown>, (options ?? {}) as TraceOptions, hasInput)
      }) as TracedModel<I>["effect"]["trace"]
    }
  }

  /**
   * A model whose every later trace (and generation, and session trace)
   * first applies `fn`'s interventions, to every row of the batch. The
   * original is unchanged unless `inplace`; the copy shares its sessions.
   *
   * @example
   * const ablated = model.edit((m) => { m.model.layers[0].mlp.output.set(0) })
   * await ablated.trace(prompt, (m) => m.lm_head.output)   // ablated
   * await model.trace(prompt, (m) => m.lm_head.output)     // original
   *
   * @since 0.1.0
   */
  edit(fn: (m: Tracer.Envoy) => void, options: { readonly inplace?: boolean } = {}): this {
    if (options.inplace) {
      this.edits = [...this.edits, fn]
      return this
    }
    const copy = Object.assign(Object.create(Object.getPrototypeOf(this)) as this, this)
    copy.edits = [...this.edits, fn]
    copy.owner = false
    ;(copy as { effect: unknown }).effect = copy.makeEffect()
    return copy
  }

  /** Removes every edit (of this object; copies made before keep theirs). */
  clearEdits(): void {
    this.edits = []
  }

  /** Decodes a model and opens its session cache in a fresh scope. */
  protected static async open(bytes: Uint8Array, options: LoadOptions, file?: string) {
    const scope = Effect.runSync(Scope.make())
    // from a file, large weights stay there: onnxruntime holds the only copy in memory
    const decoded = Onnx.decode(bytes)
    const loaded = Loaded.fromModel(file === undefined ? decoded : Weights.externalize(decoded, bytes, file), options)
    const sessions = await Effect.runPromise(Scope.provide(Sessions.make(options), scope))
    return { runtime: { loaded, sessions }, scope }
  }

  /** The module tree. */
  get tree(): ModuleTree.Tree {
    return this.runtime.loaded.tree
  }

  /** The module tree, printed as PyTorch prints a model. */
  toString(): string {
    return ModuleTree.format(this.runtime.loaded.tree)
  }

  /**
   * Runs the model with interventions: `fn` records what to read, set and
   * compute; proxies it returns come back as `Tensor`s. Without an input,
   * `fn` adds inputs with `t.invoke(input, ...)`, batched into one run.
   *
   * @example
   * const { h } = await net.trace(x, (m) => ({ h: m.layer1.output }))
   * await net.trace((m, t) => {
   *   const a = t.invoke(x1, () => m.layer1.output)
   *   return t.invoke(x2, () => { m.layer1.output.set(a); return m.output })
   * })
   *
   * @since 0.1.0
   */
  trace<R>(input: I, fn: TraceFn<I, R>, options?: TraceOptions): Promise<Tracer.Saved<R>>
  trace<R>(fn: TraceFn<I, R>, options?: TraceOptions): Promise<Tracer.Saved<R>>
  trace(a: unknown, b?: unknown, c?: unknown): Promise<unknown> {
    const [input, fn, options, hasInput] = typeof a === "function" ? [undefined, a, b, false] : [a, b, c, true]
    return runPromise(this.traceEffect(input as I, fn as TraceFn<I, unknown>, (options ?? {}) as TraceOptions, hasInput))
  }

  /**
   * Runs the model without interventions (through the same segments a trace
   * uses) and returns every graph output.
   *
   * @example
   * const { logits } = await model.run(inputs)
   *
   * @since 0.1.0
   */
  run(input: I): Promise<Record<string, Tensor>> {
    const outputs = this.runtime.loaded.model.graph.outputs.map((o) => o.name)
    return this.trace(input, (m) => Object.fromEntries(outputs.map((name, k) => [name, m.outputs[k]]))) as Promise<
      Record<string, Tensor>
    >
  }

  /**
   * Records a trace callback without running it: the intervention graph.
   *
   * @example
   * console.log(Graph.format(model.graph(x, (m) => m.layer1.output).graph))
   *
   * @since 0.1.0
   */
  record<R>(input: I, fn: TraceFn<I, R>): Tracer.Recording<I> {
    return Tracer.record(this.runtime.loaded.tree.root, fn, { input, hasInput: true, edits: this.edits })
  }

  /**
   * Shapes and dtypes without running anything: the model and the
   * interventions run on fake tensors (no onnxruntime session is created).
   * Each returned proxy comes back as `{ dtype, shape }`; a returned `.shape`
   * as its dimensions. Wrong interventions fail as they would in a trace.
   *
   * @example
   * const { h } = await model.scan(prompt, (m) => ({ h: m.model.layers[1].output }))
   * h.shape // [1, 14, 64]
   *
   * @since 0.1.0
   */
  scan<R>(input: I, fn: TraceFn<I, R>): Promise<Scanned<R>> {
    return runPromise(this.scanEffect(input, fn))
  }

  protected scanEffect<R>(input: I, fn: TraceFn<I, R>): Effect.Effect<Scanned<R>, Errors.TraceError> {
    const self = this
    return Effect.gen(function*() {
      const batch = yield* self.prepare([input])
      const scanner = Scan.make(self.runtime.loaded, { inputs: batch.feeds, rows: batch.rows })
      const recording = yield* Effect.try({
        try: () =>
          Tracer.record(self.runtime.loaded.tree.root, fn, {
            input,
            hasInput: true,
            edits: self.edits,
            shapeOf: (node) => scanner.add(node)?.shape.map((d) => (typeof d === "number" ? d : Shapes.formatDim(d)))
          }),
        catch: (e) => toTraceError(e)
      })
      const outcome = yield* Effect.try({ try: () => scanner.finish(), catch: (e) => toTraceError(e) })
      const shapes = (r: Graph.Result): unknown => {
        switch (r._tag) {
          case "Ref": {
            const f = outcome.values.get(r.id)
            if (f === undefined) return undefined
            const dims = (d: Shapes.Dim) => (typeof d === "number" ? d : Shapes.formatDim(d))
            const node = Graph.flatten(recording.graph.nodes).find((n) => n.id === r.id)
            if (node?._tag === "Op" && node.op === "Shape" && f.value !== undefined) return f.value.map(dims)
            return { dtype: f.dtype, shape: f.shape.map(dims) }
          }
          case "List":
          case "Steps":
            return r.items.map(shapes)
          case "Record":
            return Object.fromEntries(Object.entries(r.fields).map(([k, v]) => [k, shapes(v)]))
          case "Value":
            return r.value === null ? undefined : r.value
        }
      }
      return shapes(recording.graph.result) as Scanned<R>
    })
  }

  /**
   * Runs several traces, and the loops, conditions and values around them,
   * as one graph (so it can run elsewhere as one request). Values from one
   * trace flow into later ones; the session's return value comes back with
   * proxies replaced by values.
   *
   * @example
   * const { logits, acc } = await model.session((s) => {
   *   const clean = s.trace(promptA, (m) => m.model.layers[1].output)
   *   const acc = s.list()
   *   s.iter([0, 1, 2], (i) => s.cond(i.mod(2).eq(0), () => acc.append(i)))
   *   const logits = s.trace(promptB, (m) => { m.model.layers[1].output.set(clean); return m.lm_head.output })
   *   return { logits, acc } // acc: [0, 2]
   * })
   *
   * @since 0.1.0
   */
  session<R>(fn: (s: Tracer.SessionContext<I>) => R, options: { readonly remote?: Remote.Options } = {}): Promise<Tracer.Saved<R>> {
    return runPromise(this.sessionEffect(fn, options))
  }

  protected sessionEffect<R>(
    fn: (s: Tracer.SessionContext<I>) => R,
    options: { readonly remote?: Remote.Options } = {}
  ): Effect.Effect<Tracer.Saved<R>, Errors.TraceError> {
    const self = this
    return Effect.gen(function*() {
      const recording = yield* Effect.try({
        try: () => Tracer.recordSession(self.runtime.loaded.tree.root, fn, self.edits),
        catch: (e) => toTraceError(e)
      })
      const outcome = options.remote
        ? yield* Remote.session(options.remote)(self.runtime, recording.graph)
        : yield* Session.execute(self.runtime, recording.graph, {
          prepare: (inputs) => self.prepare(inputs as ReadonlyArray<I>),
          functions: recording.functions as ReadonlyArray<(...args: ReadonlyArray<unknown>) => unknown>
        })
      return materialize(recording.graph.result, outcome) as Tracer.Saved<R>
    })
  }

  /**
   * Records a session callback without running it: its graph (for pictures,
   * printing, sending).
   *
   * @example
   * Picture.toDot(model.recordSession((s) => { ... }).graph)
   *
   * @since 0.1.0
   */
  recordSession<R>(fn: (s: Tracer.SessionContext<I>) => R): Tracer.SessionRecording {
    return Tracer.recordSession(this.runtime.loaded.tree.root, fn, this.edits)
  }

  /** Releases every onnxruntime session of this model (an edited copy leaves them to its original). */
  async close(): Promise<void> {
    if (this.owner) await Effect.runPromise(Scope.close(this.scope, Exit.void))
  }

  /** Releases the model's sessions at the end of a `using` block. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }

  /** Batches the inputs of the invokes (concatenating along the first dimension). */
  protected prepare(inputs: ReadonlyArray<I>): Effect.Effect<Batch, Errors.TraceError> {
    const names = this.runtime.loaded.model.graph.inputs.map((v) => v.name)
    return Effect.try({
      try: () => batchTensors(inputs.map((i) => toNamed(i as Inputs, names))),
      catch: (e) => (Errors.isTraceError(e) ? e : new Errors.InvalidInput({ site: "", reason: String(e) }))
    })
  }

  protected traceEffect<R>(
    input: I,
    fn: TraceFn<I, R>,
    options: TraceOptions,
    hasInput: boolean
  ): Effect.Effect<Tracer.Saved<R>, Errors.TraceError> {
    const self = this
    return Effect.gen(function*() {
      // with the input known up front, nodes are scanned as they are recorded:
      // `.shape` is concrete and a wrong intervention fails at its own line
      const scannable = Scan.unsupportedOps(self.runtime.loaded.model).length === 0
      const early = hasInput && scannable ? yield* self.prepare([input]) : undefined
      const scanner = early && Scan.make(self.runtime.loaded, { inputs: early.feeds, rows: early.rows })
      const recording = yield* Effect.try({
        try: () =>
          Tracer.record(self.runtime.loaded.tree.root, fn, {
            input,
            hasInput,
            edits: self.edits,
            shapeOf: scanner && ((node) => scanner.add(node)?.shape.map((d) => (typeof d === "number" ? d : Shapes.formatDim(d))))
          }),
        catch: (e) => toTraceError(e)
      })
      const batch = early ?? (yield* self.prepare(recording.inputs))
      // validation before anything runs: no session is created for a graph that cannot run
      if (scanner !== undefined) yield* Effect.try({ try: () => scanner.finish(), catch: (e) => toTraceError(e) })
      else if (scannable) {
        const invalid = Scan.validate(self.runtime.loaded, { graph: recording.graph, inputs: batch.feeds, rows: batch.rows })
        if (invalid !== undefined) return yield* Effect.fail(invalid)
      }
      const provided = yield* Effect.serviceOption(Backend)
      const backend =
        options.backend ?? (options.remote ? Remote.backend(options.remote) : Option.getOrElse(provided, () => self.backend))
      const outcome = yield* backend.execute({
        runtime: self.runtime,
        graph: recording.graph,
        ...batch,
        ...(recording.functions.length > 0 ? { functions: recording.functions } : {})
      })
      return materialize(recording.graph.result, outcome) as Tracer.Saved<R>
    })
  }
}

/**
 * A traced ONNX model with tensor inputs.
 *
 * @since 0.1.0
 */
export class NNsight extends TracedModel<Inputs> {
  /**
   * Loads a model from an ONNX file path or its bytes.
   *
   * @example
   * const net = await NNsight.load("test/fixtures/tiny_mlp/model.onnx")
   *
   * @since 0.1.0
   */
  static async load(source: string | Uint8Array, options: LoadOptions = {}): Promise<NNsight> {
    const bytes = typeof source === "string" ? await readBytes(source) : source
    const { runtime, scope } = await NNsight.open(bytes, options, typeof source === "string" ? source : undefined)
    return new NNsight(runtime, scope, options.backend ?? Backend.local)
  }

}

/**
 * A file's bytes, without the copy `new Uint8Array(buffer)` would make.
 *
 * @since 0.1.0
 */
export const readBytes = async (file: string): Promise<Uint8Array> => {
  const buf = await fs.readFile(file)
  return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength)
}

const toTraceError = (e: unknown): Errors.TraceError => {
  if (Errors.isTraceError(e)) return e
  const tagged = e as { _tag?: string; message?: string }
  if (tagged?._tag === "InvalidIndex" || tagged?._tag === "IndexOutOfRange" || tagged?._tag === "TooManyIndices") {
    return new Errors.InvalidValue({ site: "", reason: tagged.message ?? String(e) })
  }
  if (tagged?._tag === "InvalidTensor") return new Errors.InvalidInput({ site: "", reason: tagged.message ?? String(e) })
  throw e
}

/**
 * Runs an Effect as a Promise, rejecting with the typed error itself (not a
 * wrapper), so `catch (e) { e instanceof Errors.UnknownModule }` works.
 *
 * @since 0.1.0
 */
export const runPromise = <A, E>(effect: Effect.Effect<A, E>): Promise<A> =>
  Effect.runPromiseExit(effect).then((exit) => {
    if (Exit.isSuccess(exit)) return exit.value
    throw Cause.squash(exit.cause)
  })

const toNamed = (input: Inputs, names: ReadonlyArray<string>): Readonly<Record<string, Tensor>> => {
  if (input instanceof Tensor) {
    if (names.length !== 1) {
      throw new Errors.InvalidInput({
        site: "",
        reason: `this model has ${names.length} inputs (${names.join(", ")}): pass them by name`
      })
    }
    return { [names[0]]: input }
  }
  return input
}

/**
 * Concatenates named inputs along their first dimension.
 *
 * @since 0.1.0
 */
export const batchTensors = (inputs: ReadonlyArray<Readonly<Record<string, Tensor>>>): Batch => {
  const names = Object.keys(inputs[0] ?? {})
  const rows: Array<Local.Rows> = []
  let start = 0
  for (const input of inputs) {
    const first = input[names[0]]
    const count = first?.shape[0] ?? 1
    for (const name of names) {
      const t = input[name]
      if (t === undefined) throw new Errors.InvalidInput({ site: "", reason: `an invoke is missing input "${name}"` })
      if (t.shape[0] !== count) {
        throw new Errors.InvalidInput({ site: "", reason: `inputs of one invoke disagree on the batch size (${names[0]}: ${count}, ${name}: ${t.shape[0]})` })
      }
    }
    rows.push({ start, count })
    start += count
  }
  if (inputs.length === 1) return { feeds: inputs[0], rows }
  const feeds: Record<string, Tensor> = {}
  for (const name of names) feeds[name] = concat0(inputs.map((i) => i[name]), name)
  return { feeds, rows }
}

const concat0 = (parts: ReadonlyArray<Tensor>, name: string): Tensor => {
  const [first] = parts
  const rest = first.shape.slice(1)
  for (const p of parts) {
    if (p.dtype !== first.dtype || p.shape.length !== first.shape.length || p.shape.slice(1).some((d, i) => d !== rest[i])) {
      throw new Errors.InvalidInput({
        site: "",
        reason: `invokes' "${name}" inputs cannot be batched: shapes [${first.shape}] (${first.dtype}) and [${p.shape}] (${p.dtype})`
      })
    }
  }
  const total = parts.reduce((a, p) => a + p.shape[0], 0)
  const out = DType.arrayFor(first.dtype, total * rest.reduce((a, b) => a * b, 1)) as unknown as { set?: (a: ArrayLike<unknown>, o: number) => void } & Array<unknown>
  let offset = 0
  for (const p of parts) {
    const d = p.data as unknown as ArrayLike<unknown>
    if (typeof out.set === "function") out.set(d, offset)
    else for (let i = 0; i < d.length; i++) out[offset + i] = d[i]
    offset += d.length
  }
  return new Tensor(first.dtype, [total, ...rest], out as unknown as DType.ArrayOf[DType.DType])
}

/**
 * The user's result: references replaced by tensors; an unavailable value is
 * a property that throws its typed error when read.
 *
 * @since 0.1.0
 */
export const materialize = (result: Graph.Result, outcome: Local.Outcome): unknown => {
  switch (result._tag) {
    case "Ref": {
      const v = outcome.values.get(result.id)
      if (v !== undefined) return Values.toUser(v)
      throw outcome.unavailable.get(result.id) ?? new Errors.Unavailable({ site: "", reason: "no value was computed" })
    }
    case "List": {
      const out: Array<unknown> = []
      result.items.forEach((r, i) => {
        if (r._tag === "Ref" && !outcome.values.has(r.id)) {
          const error = outcome.unavailable.get(r.id) ?? new Errors.Unavailable({ site: "", reason: "no value was computed" })
          Object.defineProperty(out, i, {
            enumerable: true,
            get: () => {
              throw error
            }
          })
        } else out[i] = materialize(r, outcome)
      })
      return out
    }
    case "Steps": {
      // the steps that ran: a generation that ended early has fewer
      const ran = result.items.findIndex((r) => Graph.resultRefs(r).some((id) => !outcome.values.has(id)))
      return (ran === -1 ? result.items : result.items.slice(0, ran)).map((r) => materialize(r, outcome))
    }
    case "Record": {
      const out: Record<string, unknown> = {}
      for (const [k, r] of Object.entries(result.fields)) {
        if (r._tag === "Ref" && !outcome.values.has(r.id)) {
          const error = outcome.unavailable.get(r.id) ?? new Errors.Unavailable({ site: "", reason: "no value was computed" })
          Object.defineProperty(out, k, {
            enumerable: true,
            get: () => {
              throw error
            }
          })
        } else out[k] = materialize(r, outcome)
      }
      return out
    }
    case "Value":
      return result.value === null ? undefined : result.value
  }
}
