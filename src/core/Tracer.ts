/**
 * The builder: runs a user's trace callback once, against envoys (stand-ins
 * for the model's modules) and proxies (stand-ins for tensors), and records
 * the intervention graph. Nothing executes here.
 *
 * @example
 * import * as Tracer from "./Tracer.js"
 * const { graph } = Tracer.record(tree, (m, t) => ({ h: m.model.layers[1].output }), 1)
 *
 * @since 0.1.0
 */
import * as Errors from "./Errors.js"
import type * as Graph from "./Graph.js"
import * as Index from "./Index.js"
import * as Literal from "./Literal.js"
import type * as Ops from "./Ops.js"
import * as Site from "./Site.js"
import { Tensor, type Input as TensorInput } from "./Tensor.js"
import type * as DType from "./DType.js"

/**
 * What the builder needs to know of a module (a `ModuleTree.Module` fits).
 *
 * @since 0.1.0
 */
export interface ModuleInfo {
  readonly path: string
  readonly name: string
  readonly children: ReadonlyArray<ModuleInfo>
  readonly calls: ReadonlyArray<{ readonly inputs: ReadonlyArray<string>; readonly outputs: ReadonlyArray<string> }>
  readonly parameters: ReadonlyArray<{ readonly name: string }>
}

type NodeBody = Graph.Node extends infer N ? (N extends Graph.Node ? Omit<N, "id" | "site"> : never) : never

/**
 * A value an operation accepts: a proxy, a JavaScript number or boolean, a
 * `Tensor`, or nested arrays of numbers.
 *
 * @since 0.1.0
 */
export type Operand = TensorProxy | number | boolean | string | null | Tensor | ReadonlyArray<unknown>

/**
 * The recording state of one trace.
 *
 * @since 0.1.0
 */
export class Recorder {
  readonly nodes: Array<Graph.Node> = []
  invoke = 0
  invokes = 0
  /** The generation step hooks address (moved by `t.next()`, `t.all()`, `iter`). */
  step = 0
  private readonly local = new Map<string, number>()
  /**
   * While replaying a callback (for `t.all()`), nodes recorded before
   * `replayUntil` are the first pass's nodes: `push` hands back their ids.
   */
  replayUntil = 0
  private cursor = 0

  constructor(
    readonly root: ModuleInfo,
    /** Forward passes the run will make (generation steps); 1 for a trace. */
    readonly steps: number = 1
  ) {}

  /** The next node id (ids are global across nested bodies). */
  nextId = 0
  /** The node lists being recorded into: the graph's, then nested bodies. */
  private readonly lists: Array<Array<Graph.Node>> = [this.nodes]
  /** Functions of `apply(fn, ...)`, referenced by index from `Call` nodes. */
  readonly functions: Array<(...args: ReadonlyArray<never>) => unknown> = []
  /** Whether nodes are being recorded inside a trace (not at session level). */
  inTrace = true
  /**
   * Scans each recorded node when the trace's input is known, so `.shape`
   * is concrete while tracing (set by the model; absent in invoke mode).
   */
  shapeOf: ((node: Graph.Node) => ReadonlyArray<number | string> | undefined) | undefined
  private readonly shapes = new Map<number, ReadonlyArray<number | string>>()

  /** The known shape of a node's value. */
  knownShape(id: number): ReadonlyArray<number | string> | undefined {
    return this.shapes.get(id)
  }

  push(body: NodeBody, site: Site.Lazy = Site.capture()): number {
    if (this.cursor < this.replayUntil) return this.cursor++
    const id = this.nextId++
    const node = { ...body, id } as Graph.Node
    if (typeof site === "string") (node as { site: string }).site = site
    else {
      // the site's text is made on first read (an error message, an encoding)
      let text: string | undefined
      Object.defineProperty(node, "site", { enumerable: true, get: () => (text ??= Site.format(site)) })
    }
    this.lists[this.lists.length - 1].push(node)
    this.cursor = id + 1
    if (this.shapeOf !== undefined) {
      const shape = this.shapeOf(node)
      if (shape !== undefined) this.shapes.set(id, shape)
    }
    return id
  }

  /** The node list being recorded into now. */
  current(): Array<Graph.Node> {
    return this.lists[this.lists.length - 1]
  }

  /** Records `fn` into a new node list (a nested body) and returns it. */
  block(fn: () => void): Array<Graph.Node> {
    const list: Array<Graph.Node> = []
    this.lists.push(list)
    try {
      fn()
    } finally {
      this.lists.pop()
    }
    return list
  }

  /**
   * Records a node with nested bodies: its id comes before its bodies' ids,
   * its place in the current list is kept while the bodies are recorded.
   */
  nested(make: (id: number) => Graph.Node, bodies: () => void): number {
    if (this.cursor < this.replayUntil) {
      const id = this.cursor++
      bodies()
      return id
    }
    const id = this.nextId++
    const list = this.lists[this.lists.length - 1]
    const at = list.length
    list.push(undefined as unknown as Graph.Node)
    this.cursor = id + 1
    bodies()
    list[at] = make(id)
    return id
  }

  /** Whether `push` is handing back first-pass nodes now. */
  replaying(): boolean {
    return this.cursor < this.replayUntil
  }

  /** Starts replaying the callback from its first node. */
  replay(until: number): void {
    this.replayUntil = until
    this.cursor = 0
    this.local.clear()
    this.step = 0
    this.invoke = 0
  }

  /** Which call of a module the next `.input`/`.output` reads: its call in the current step, moved by `.next()`. */
  callOf(module: ModuleInfo): number {
    return this.step * Math.max(1, module.calls.length) + (this.local.get(module.path) ?? 0)
  }

  advance(path: string): void {
    this.local.set(path, (this.local.get(path) ?? 0) + 1)
  }

  /** Moves every module to the next generation step. */
  nextStep(): void {
    this.step++
    this.local.clear()
  }

  operand(value: Operand, site: Site.Lazy): number {
    if (value instanceof TensorProxy) {
      if (value.recorder !== this) {
        throw new Errors.InvalidValue({ site: Site.format(site), reason: "a proxy from another trace was used; return it as a result and pass the Tensor instead" })
      }
      return value.id
    }
    // JSON has no Infinity, NaN or -0: such numbers travel as 0-d tensors
    if (typeof value === "number" && (!Number.isFinite(value) || Object.is(value, -0))) {
      return this.push({ _tag: "Constant", value: Literal.fromTensor(new Tensor("float32", [], Float32Array.of(value))) }, site)
    }
    if (typeof value === "number" || typeof value === "boolean") return this.push({ _tag: "Scalar", value }, site)
    if (typeof value === "string" || value === null) return this.push({ _tag: "Value", value }, site)
    if (Array.isArray(value) && (value.some((v) => v instanceof TensorProxy || v instanceof Tensor) || (!this.inTrace && !isJson(value)))) {
      return this.list(value as ReadonlyArray<Operand>).id
    }
    if (Array.isArray(value) && !this.inTrace) return this.push({ _tag: "Value", value: value as never }, site)
    const tensor = value instanceof Tensor ? value : Tensor.from(value as TensorInput)
    return this.push({ _tag: "Constant", value: Literal.fromTensor(tensor) }, site)
  }

  /** Records a condition: `then` runs when `predicate` holds, else `otherwise`. */
  cond(predicate: Operand, then: () => void, otherwise?: () => void): void {
    const site = Site.capture()
    const p = this.operand(predicate, site)
    let thenNodes: ReadonlyArray<Graph.Node> = []
    let elseNodes: ReadonlyArray<Graph.Node> = []
    this.nested(
      (id) => ({ _tag: "Cond", id, site: Site.format(site), predicate: p, then: thenNodes, otherwise: elseNodes }),
      () => {
        thenNodes = this.block(then)
        if (otherwise !== undefined) elseNodes = this.block(otherwise)
      }
    )
  }

  /** A graph-side list with initial items. */
  list(items: ReadonlyArray<Operand>): ListProxy {
    const site = Site.capture()
    const ids = items.map((i) => this.operand(i, site))
    return new ListProxy(this, this.push({ _tag: "ListNew", items: ids }, site))
  }

  /** A graph-side dictionary. */
  dict(): DictProxy {
    return new DictProxy(this, this.push({ _tag: "DictNew" }))
  }

  /** Runs a local function on values when the graph runs. */
  apply(fn: (...args: ReadonlyArray<never>) => unknown, args: ReadonlyArray<Operand>): TensorProxy {
    const site = Site.capture()
    const ids = args.map((a) => this.operand(a, site))
    this.functions.push(fn)
    return new TensorProxy(this, this.push({ _tag: "Call", fn: this.functions.length - 1, args: ids }, site))
  }

  /** Prints values when the graph runs. */
  log(args: ReadonlyArray<Operand>): void {
    const site = Site.capture()
    const ids = args.map((a) => this.operand(a, site))
    this.push({ _tag: "Log", args: ids }, site)
  }

  op(op: Ops.OpName, args: ReadonlyArray<Operand>, attrs: Record<string, unknown> = {}): TensorProxy {
    const site = Site.capture()
    const ids = args.map((a) => this.operand(a, site))
    return new TensorProxy(this, this.push({ _tag: "Op", op, args: ids, attrs: attrs as any }, site))
  }
}

const isJson = (u: unknown): boolean =>
  u === null ||
  typeof u === "string" ||
  typeof u === "boolean" ||
  (typeof u === "number" && Number.isFinite(u)) ||
  (Array.isArray(u) && u.every(isJson))

/**
 * A tensor that will exist when the trace runs. Methods record operations and
 * return new proxies; returned from the trace callback, a proxy comes back as
 * a `Tensor`.
 *
 * @example
 * const logits = m.lm_head.output
 * const probs = logits.at(":", -1).softmax(-1)
 *
 * @since 0.1.0
 */
export class TensorProxy {
  constructor(
    readonly recorder: Recorder,
    readonly id: number
  ) {}

  /** `this + other`, broadcasting. */
  add(other: Operand): TensorProxy {
    return this.recorder.op("Add", [this, other])
  }
  /** `this - other`, broadcasting. */
  sub(other: Operand): TensorProxy {
    return this.recorder.op("Sub", [this, other])
  }
  /** `this * other`, broadcasting. */
  mul(other: Operand): TensorProxy {
    return this.recorder.op("Mul", [this, other])
  }
  /** `this / other`, broadcasting. */
  div(other: Operand): TensorProxy {
    return this.recorder.op("Div", [this, other])
  }
  /** `this ** other`, broadcasting. */
  pow(other: Operand): TensorProxy {
    return this.recorder.op("Pow", [this, other])
  }
  /** `this % other` (Python's modulo: the sign of `other`). */
  mod(other: Operand): TensorProxy {
    return this.recorder.op("Mod", [this, other])
  }
  /** On a graph-side list (`s.list()`): appends a value when the graph runs. */
  append(value: Operand): void {
    const site = Site.capture()
    const v = this.recorder.operand(value, site)
    this.recorder.push({ _tag: "Append", target: this.id, value: v, key: null }, site)
  }
  /** On a graph-side dictionary (`s.dict()`): sets `key` when the graph runs. */
  put(key: string, value: Operand): void {
    const site = Site.capture()
    const v = this.recorder.operand(value, site)
    this.recorder.push({ _tag: "Append", target: this.id, value: v, key }, site)
  }
  /** `-this`. */
  neg(): TensorProxy {
    return this.recorder.op("Neg", [this])
  }
  abs(): TensorProxy {
    return this.recorder.op("Abs", [this])
  }
  exp(): TensorProxy {
    return this.recorder.op("Exp", [this])
  }
  log(): TensorProxy {
    return this.recorder.op("Log", [this])
  }
  sqrt(): TensorProxy {
    return this.recorder.op("Sqrt", [this])
  }
  tanh(): TensorProxy {
    return this.recorder.op("Tanh", [this])
  }
  sigmoid(): TensorProxy {
    return this.recorder.op("Sigmoid", [this])
  }
  relu(): TensorProxy {
    return this.recorder.op("Relu", [this])
  }
  /** Matrix product with NumPy's `matmul` broadcasting. */
  matmul(other: Operand): TensorProxy {
    return this.recorder.op("MatMul", [this, other])
  }
  /** Softmax along `axis` (default last). */
  softmax(axis = -1): TensorProxy {
    return this.recorder.op("Softmax", [this], { axis })
  }
  /** Log-softmax along `axis` (default last). */
  logSoftmax(axis = -1): TensorProxy {
    return this.recorder.op("LogSoftmax", [this], { axis })
  }
  /** Index of the largest element along `axis` (default: over all elements, flattened). */
  argmax(axis?: number, keepdims = false): TensorProxy {
    if (axis === undefined) return this.reshape(-1).argmax(0, keepdims)
    return this.recorder.op("ArgMax", [this], { axis, keepdims })
  }
  /** The `k` largest elements along `axis` (default last) and their indices. */
  topk(k: number, axis = -1, largest = true): { readonly values: TensorProxy; readonly indices: TensorProxy } {
    const both = this.recorder.op("TopK", [this], { k, axis, largest })
    return {
      values: this.recorder.op("Select", [both], { index: 0 }),
      indices: this.recorder.op("Select", [both], { index: 1 })
    }
  }
  /** Sum over `axes` (default all). */
  sum(axes?: number | ReadonlyArray<number>, keepdims = false): TensorProxy {
    return this.recorder.op("ReduceSum", [this], reduction(axes, keepdims))
  }
  /** Mean over `axes` (default all). */
  mean(axes?: number | ReadonlyArray<number>, keepdims = false): TensorProxy {
    return this.recorder.op("ReduceMean", [this], reduction(axes, keepdims))
  }
  /** Maximum over `axes` (default all). */
  max(axes?: number | ReadonlyArray<number>, keepdims = false): TensorProxy {
    return this.recorder.op("ReduceMax", [this], reduction(axes, keepdims))
  }
  /** Euclidean norm over `axes` (default all). */
  norm(axes?: number | ReadonlyArray<number>, keepdims = false): TensorProxy {
    return this.recorder.op("ReduceL2", [this], reduction(axes, keepdims))
  }
  /** A copy (values are immutable; this is an identity node). */
  clone(): TensorProxy {
    return this.recorder.op("Identity", [this])
  }
  /** Concatenation with `others` along `axis`. */
  cat(others: ReadonlyArray<Operand>, axis = 0): TensorProxy {
    return this.recorder.op("Concat", [this, ...others], { axis })
  }
  eq(other: Operand): TensorProxy {
    return this.recorder.op("Equal", [this, other])
  }
  ne(other: Operand): TensorProxy {
    return this.recorder.op("Not", [this.recorder.op("Equal", [this, other])])
  }
  lt(other: Operand): TensorProxy {
    return this.recorder.op("Less", [this, other])
  }
  le(other: Operand): TensorProxy {
    return this.recorder.op("LessOrEqual", [this, other])
  }
  gt(other: Operand): TensorProxy {
    return this.recorder.op("Greater", [this, other])
  }
  ge(other: Operand): TensorProxy {
    return this.recorder.op("GreaterOrEqual", [this, other])
  }
  not(): TensorProxy {
    return this.recorder.op("Not", [this])
  }
  and(other: Operand): TensorProxy {
    return this.recorder.op("And", [this, other])
  }
  or(other: Operand): TensorProxy {
    return this.recorder.op("Or", [this, other])
  }
  /** Elementwise `cond ? this : other` (`cond` a bool tensor). */
  where(cond: Operand, other: Operand): TensorProxy {
    return this.recorder.op("Where", [cond, this, other])
  }
  /** Conversion to another dtype. */
  to(dtype: DType.DType): TensorProxy {
    return this.recorder.op("Cast", [this], { to: dtype })
  }
  /** A view with another shape (one dimension may be -1). */
  reshape(...shape: ReadonlyArray<number>): TensorProxy {
    return this.recorder.op("Reshape", [this], { shape: [...shape] })
  }
  /** Swaps two dimensions (PyTorch's `transpose(d0, d1)`), or permutes them all with `permute`. */
  transpose(dim0 = -2, dim1 = -1): TensorProxy {
    return this.recorder.op("Transpose", [this], { swap: [dim0, dim1] })
  }
  /** Reorders dimensions. */
  permute(...perm: ReadonlyArray<number>): TensorProxy {
    return this.recorder.op("Transpose", [this], { perm: [...perm] })
  }
  unsqueeze(axis: number): TensorProxy {
    return this.recorder.op("Unsqueeze", [this], { axes: [axis] })
  }
  squeeze(axis?: number): TensorProxy {
    return this.recorder.op("Squeeze", [this], axis === undefined ? {} : { axes: [axis] })
  }
  /** Broadcasts to a shape. */
  expand(...shape: ReadonlyArray<number>): TensorProxy {
    return this.recorder.op("Expand", [this], { shape: [...shape] })
  }
  /**
   * Python-style indexing: `x.at(":", -1)` is `x[:, -1]`; strings are slices
   * (`"1:3"`, `"::2"`, `"..."`), numbers pick (negative from the end), `null`
   * adds an axis.
   */
  at(...items: ReadonlyArray<Index.Item>): TensorProxy {
    checkIndex(items)
    return this.recorder.op("Index", [this], { items: encodeItems(items) })
  }
  /**
   * The gradient of this value (a module's input or output, a parameter, or
   * a value made outside the forward pass such as a session variable) in the
   * next `backward()` recorded after this read. `.grad.set(v)` replaces
   * it: what flows further back is `v`.
   *
   * @example
   * const g = m.layer1.output.grad
   * m.output.sum().backward()
   */
  get grad(): GradProxy {
    return new GradProxy(this.recorder, this.recorder.push({ _tag: "Grad", of: this.id }), this.id)
  }

  /** Back-propagates from this value (seeded with ones) once the forward pass is done. */
  backward(): void {
    this.recorder.push({ _tag: "Backward", loss: this.id })
  }

  /**
   * The shape. While tracing with an input (and in `model.scan`) it is known
   * at once: index it (`x.shape[1]`), spread it, compare it. Symbolic
   * dimensions read as strings. Returned from a trace, it comes back as the
   * int64 tensor of the shape.
   */
  get shape(): ShapeProxy {
    const proxy = this.recorder.op("Shape", [this])
    return shapeProxy(proxy, this.recorder.knownShape(this.id))
  }
}

/** Fails at the user's line on a malformed index. */
const checkIndex = (items: ReadonlyArray<Index.Item>): void => {
  try {
    Index.parse(items)
  } catch (e) {
    throw new Errors.InvalidValue({ site: Site.here(), reason: e instanceof Error ? e.message : String(e) })
  }
}

/**
 * The shape of a proxied tensor: a proxy of its int64 shape tensor that also
 * reads as an array of dimensions when they are known at trace time.
 *
 * @since 0.1.0
 */
export type ShapeProxy = TensorProxy & { readonly [dim: number]: number; readonly length: number; readonly dims: ReadonlyArray<number | string> } & Iterable<number>

const shapeProxy = (proxy: TensorProxy, dims: ReadonlyArray<number | string> | undefined): ShapeProxy => {
  const known = () => {
    if (dims === undefined) {
      throw new Errors.InvalidValue({
        site: Site.here(),
        reason: "this shape is not known while tracing (it is, in a trace given its input, or in model.scan); use it as a tensor instead"
      })
    }
    return dims
  }
  return new Proxy(proxy, {
    get(target, key, receiver) {
      if (key === "dims") return known()
      if (key === "length") return known().length
      if (key === Symbol.iterator) return () => known()[Symbol.iterator]()
      if (typeof key === "string" && /^\d+$/.test(key)) return known()[Number(key)]
      return Reflect.get(target, key, receiver)
    }
  }) as ShapeProxy
}

const reduction = (axes: number | ReadonlyArray<number> | undefined, keepdims: boolean) =>
  axes === undefined ? { keepdims } : { axes: typeof axes === "number" ? [axes] : [...axes], keepdims }

const encodeItems = (items: ReadonlyArray<Index.Item>): ReadonlyArray<unknown> =>
  items.map((i) => (i !== null && typeof i === "object" ? { slice: [i.start ?? null, i.stop ?? null, i.step ?? null] } : i))

/**
 * Decodes index items from their JSON attribute form.
 *
 * @since 0.1.0
 */
export const decodeItems = (u: unknown): ReadonlyArray<Index.Item> =>
  (u as ReadonlyArray<unknown>).map((i) => {
    if (i !== null && typeof i === "object" && "slice" in i) {
      const [start, stop, step] = (i as { slice: [number | null, number | null, number | null] }).slice
      return { start: start ?? undefined, stop: stop ?? undefined, step: step ?? undefined }
    }
    return i as Index.Item
  })

/**
 * A gradient. `set(v)` replaces it in the backward pass.
 *
 * @since 0.1.0
 */
export class GradProxy extends TensorProxy {
  constructor(
    recorder: Recorder,
    id: number,
    readonly of: number
  ) {
    super(recorder, id)
  }

  /** Replaces this gradient: what flows further back is `value`. */
  set(value: Operand): void {
    const site = Site.capture()
    const v = this.recorder.operand(value, site)
    this.recorder.push({ _tag: "SetGrad", of: this.of, value: v }, site)
  }

  /** Replaces this gradient by `fn(gradient)`. */
  update(fn: (g: TensorProxy) => Operand): void {
    this.set(fn(this))
  }
}

/**
 * A graph-side list (`s.list()`, `t.list()`): `append` adds to it while the
 * graph runs; returned, it comes back as an array.
 *
 * @example
 * const seen = s.list()
 * s.iter(prompts, (p) => s.trace(p, (m) => seen.append(m.lm_head.output.at(0, -1).argmax())))
 *
 * @since 0.1.0
 */
export class ListProxy extends TensorProxy {
  declare readonly _list: true
}

/**
 * A graph-side dictionary (`s.dict()`, `t.dict()`): `put` sets a key while
 * the graph runs; returned, it comes back as a plain object.
 *
 * @example
 * const d = s.dict()
 * d.put("loss", loss)
 *
 * @since 0.1.0
 */
export class DictProxy extends TensorProxy {
  declare readonly _dict: true
}

/**
 * A variable (`s.variable(initial)`): a value that `set(v)` and `update(fn)`
 * replace for every node recorded after them, across a session's traces and
 * loop passes. Its gradient (`v.grad`) is how weights trained inside a
 * session (a LoRA adapter, a steering vector) learn.
 *
 * @example
 * const w = s.variable(Tensor.zeros([64]))
 * s.iter(prompts, (p) => {
 *   s.trace(p, (m, t) => {
 *     m.model.layers[1].output.update((h) => h.add(w))
 *     const g = w.grad
 *     m.output.at(0).at(0, -1, 42).neg().backward()
 *     w.update((x) => x.sub(g.mul(0.1)))
 *   })
 * })
 *
 * @since 0.1.0
 */
export class VariableProxy extends TensorProxy {
  /** Gives the variable a new value: nodes recorded after this see `value`. */
  set(value: Operand): void {
    const site = Site.capture()
    const v = this.recorder.operand(value, site)
    this.recorder.push({ _tag: "Assign", target: this.id, value: v }, site)
  }

  /** Replaces the variable's value by `fn(value)`. */
  update(fn: (x: TensorProxy) => Operand): void {
    this.set(fn(this))
  }
}

/**
 * A module's input or output tensor. Besides tensor operations, it can be
 * replaced: `set(v)`, `setAt(index, v)`, `update(fn)`.
 *
 * @example
 * m.model.layers[0].mlp.output.set(0)
 * m.model.layers[1].output.setAt([":", -1], src)
 *
 * @since 0.1.0
 */
export class HookProxy extends TensorProxy {
  constructor(
    recorder: Recorder,
    id: number,
    readonly ref: Graph.HookRef,
    readonly size: number
  ) {
    super(recorder, id)
  }

  /** Replaces this tensor for the rest of the forward pass. */
  set(value: Operand): void {
    const site = Site.capture()
    const v = this.recorder.operand(value, site)
    this.recorder.push({ _tag: "Set", ref: this.ref, value: v }, site)
  }

  /** Replaces the part `items` selects (`x[items] = value` in Python). */
  setAt(items: ReadonlyArray<Index.Item>, value: Operand): void {
    checkIndex(items)
    this.set(this.recorder.op("SetIndex", [this, value], { items: encodeItems(items) }))
  }

  /** Replaces this tensor by `fn(this)`. */
  update(fn: (x: TensorProxy) => Operand): void {
    this.set(fn(this))
  }

  /**
   * On a module with several outputs (or inputs), one integer picks one of
   * them, like `output[0]` on a PyTorch tuple; otherwise this indexes the
   * (first) tensor.
   */
  override at(...items: ReadonlyArray<Index.Item>): TensorProxy {
    if (this.size > 1 && items.length === 1 && typeof items[0] === "number") {
      const k = items[0] < 0 ? this.size + items[0] : items[0]
      if (k < 0 || k >= this.size) {
        throw new Errors.ModuleIndexOutOfRange({
          path: this.ref.module,
          what: this.ref.point,
          index: items[0],
          size: this.size,
          site: Site.here()
        })
      }
      return hook(this.recorder, { ...this.ref, index: k }, this.size)
    }
    return super.at(...items)
  }
}

const hook = (recorder: Recorder, ref: Graph.HookRef, size: number): HookProxy =>
  new HookProxy(recorder, recorder.push({ _tag: "Hook", ref }), ref, size)

/**
 * The members every envoy has; children and parameters are reached by name.
 *
 * @since 0.1.0
 */
export interface EnvoyMembers {
  /** The module's (first) output; `.at(k)` picks the k-th of several. */
  readonly output: HookProxy
  /** The module's first input (its main activation). */
  readonly input: HookProxy
  /** Every input, in the documented order. */
  readonly inputs: ReadonlyArray<HookProxy>
  /** Every output, in the documented order. */
  readonly outputs: ReadonlyArray<HookProxy>
  /** Runs this module on new inputs (its first inputs), giving its first output. */
  call(...args: ReadonlyArray<Operand>): TensorProxy
  /** The i-th child of a ModuleList (negative from the end). */
  at(i: number): Envoy
  /** Moves to the module's next call (the next generation step, or the next of several calls in one pass). */
  next(): Envoy
  /** Records `fn` once for every generation step; gives the list of what it returns. */
  all<R>(fn: (step: number) => R): ReadonlyArray<R>
  /** Records `fn` for the given steps (a list, or `{ start, stop }` with `stop` excluded). */
  iter<R>(steps: ReadonlyArray<number> | { readonly start?: number; readonly stop?: number }, fn: (step: number) => R): ReadonlyArray<R>
  /** The module's dotted path. */
  readonly path: string
  /** The module's `weight` parameter, in PyTorch's layout (e.g. `[out, in]` for Linear). */
  readonly weight: TensorProxy
  /** The module's `bias` parameter. */
  readonly bias: TensorProxy
  /** Any parameter by name. */
  param(name: string): TensorProxy
}

/**
 * A stand-in for a module during tracing. Children are properties
 * (`m.model.layers[1].self_attn`); parameters too (`m.lm_head.weight`).
 *
 * @since 0.1.0
 */
export type Envoy = EnvoyMembers & { readonly [child: string]: Envoy }

const members = new Set(["output", "input", "inputs", "outputs", "call", "at", "next", "all", "iter", "path", "then", "param"])

/**
 * Makes the envoy of a module.
 *
 * @since 0.1.0
 */
export const envoy = (recorder: Recorder, module: ModuleInfo): Envoy => {
  // envoys hold no state of their own (the recorder does): one per module
  let cache = envoys.get(recorder)
  if (cache === undefined) envoys.set(recorder, (cache = new Map()))
  let made = cache.get(module)
  if (made === undefined) cache.set(module, (made = makeEnvoy(recorder, module)))
  return made
}

const envoys = new WeakMap<Recorder, Map<ModuleInfo, Envoy>>()

const makeEnvoy = (recorder: Recorder, module: ModuleInfo): Envoy => {
  const byName = new Map(module.children.map((c) => [c.name, c]))
  const params = new Map(module.parameters.map((p) => [p.name, p]))
  const isList = module.children.length > 0 && module.children.every((c) => /^\d+$/.test(c.name))
  const callInfo = () => {
    const call = recorder.callOf(module)
    const perPass = Math.max(1, module.calls.length)
    const info = Math.floor(call / perPass) < recorder.steps ? module.calls[call % perPass] : undefined
    if (info === undefined) {
      throw new Errors.ModuleIndexOutOfRange({
        path: module.path,
        what: "call",
        index: call,
        size: module.calls.length * recorder.steps,
        site: Site.here()
      })
    }
    return { call, info }
  }
  const hookAt = (point: "input" | "output", index: number) => {
    const { call, info } = callInfo()
    const size = point === "input" ? info.inputs.length : info.outputs.length
    if (index >= size) {
      throw new Errors.ModuleIndexOutOfRange({ path: module.path, what: point, index, size, site: Site.here() })
    }
    return hook(recorder, { module: module.path, call, invoke: recorder.invoke, point, index }, size)
  }
  const child = (key: string): Envoy => {
    const c = byName.get(key)
    if (c !== undefined) return envoy(recorder, c)
    if (/^-?\d+$/.test(key) && isList) {
      throw new Errors.ModuleIndexOutOfRange({
        path: module.path,
        what: "module",
        index: Number(key),
        size: module.children.length,
        site: Site.here()
      })
    }
    throw new Errors.UnknownModule({
      path: module.path,
      name: key,
      available: [...byName.keys(), ...params.keys()],
      site: Site.here()
    })
  }
  const self: EnvoyMembers = {
    get output() {
      return hookAt("output", 0)
    },
    get input() {
      return hookAt("input", 0)
    },
    get inputs() {
      const { info } = callInfo()
      return info.inputs.map((_, k) => hookAt("input", k))
    },
    get outputs() {
      const { info } = callInfo()
      return info.outputs.map((_, k) => hookAt("output", k))
    },
    call: (...args) => {
      const { call } = callInfo()
      const site = Site.capture()
      const ids = args.map((a) => recorder.operand(a, site))
      return new TensorProxy(
        recorder,
        recorder.push({ _tag: "Apply", module: module.path, call, invoke: recorder.invoke, args: ids }, site)
      )
    },
    at: (i) => child(String(i < 0 && isList ? module.children.length + i : i)),
    next: () => {
      recorder.advance(module.path)
      return proxy
    },
    all: (fn) => eachStep(recorder, range(0, recorder.steps), fn),
    iter: (steps, fn) => eachStep(recorder, stepList(steps, recorder.steps), fn),
    path: module.path,
    get weight() {
      return byName.has("weight") ? (child("weight") as unknown as TensorProxy) : param("weight")
    },
    get bias() {
      return byName.has("bias") ? (child("bias") as unknown as TensorProxy) : param("bias")
    },
    param: (name) => param(name)
  }
  const param = (name: string): TensorProxy => {
    if (!params.has(name)) {
      throw new Errors.UnknownModule({
        path: module.path,
        name,
        available: [...byName.keys(), ...params.keys()],
        site: Site.here()
      })
    }
    return new TensorProxy(recorder, recorder.push({ _tag: "Param", module: module.path, name }))
  }
  const proxy: Envoy = new Proxy(self as Envoy, {
    get(target, key) {
      if (typeof key === "symbol") return (target as any)[key]
      if (members.has(key)) return key === "then" ? undefined : (target as any)[key]
      if (byName.has(key)) return child(key)
      if (params.has(key)) return param(key)
      if (key === "weight" || key === "bias") return (target as any)[key]
      return child(key)
    }
  })
  return proxy
}

/**
 * The tracer handed to trace callbacks (`(m, t) => ...`).
 *
 * @since 0.1.0
 */
export interface Context<I> {
  /** Adds an input to the batch; `fn`'s reads and writes address its rows only. */
  invoke<R>(input: I, fn: () => R): R
  /** Stops the forward pass once everything recorded before it has run. */
  stop(): void
  /** Concatenates tensors along `axis`. */
  cat(items: ReadonlyArray<Operand>, axis?: number): TensorProxy
  /** A constant tensor in the graph. */
  constant(value: Operand): TensorProxy
  /** Moves every module to the next generation step. */
  next(): void
  /** Records `then` to run only when `predicate` holds when the graph runs (else `otherwise`). */
  cond(predicate: Operand, then: () => void, otherwise?: () => void): void
  /** A graph-side list. */
  list(...items: ReadonlyArray<Operand>): ListProxy
  /** A graph-side dictionary. */
  dict(): DictProxy
  /** Runs a local TypeScript function on values when the graph runs (local backends only). */
  apply<A extends ReadonlyArray<unknown>>(fn: (...args: A) => unknown, ...args: ReadonlyArray<Operand>): TensorProxy
  /** Prints values when the graph runs. */
  log(...args: ReadonlyArray<Operand>): void
  /**
   * With a callback: records it once per generation step and gives the list
   * of what it returns. Without: everything recorded after this call applies
   * to every step, and values it returns come back as lists (one per step).
   */
  all(): void
  all<R>(fn: (step: number) => R): ReadonlyArray<R>
  /** Records `fn` for the given steps and gives the list of what it returns. */
  iter<R>(steps: ReadonlyArray<number> | { readonly start?: number; readonly stop?: number }, fn: (step: number) => R): ReadonlyArray<R>
}

const range = (start: number, stop: number): ReadonlyArray<number> => Array.from({ length: Math.max(0, stop - start) }, (_, i) => start + i)

const stepList = (
  steps: ReadonlyArray<number> | { readonly start?: number; readonly stop?: number },
  total: number
): ReadonlyArray<number> => (Array.isArray(steps) ? steps : range((steps as { start?: number }).start ?? 0, (steps as { stop?: number }).stop ?? total))

/** Marks arrays that hold one value per generation step. */
const perStep = Symbol.for("nnsight-ts/perStep")

const eachStep = <R>(recorder: Recorder, steps: ReadonlyArray<number>, fn: (step: number) => R): ReadonlyArray<R> => {
  const saved = recorder.step
  try {
    const out = steps.map((s) => {
      if (s < 0 || s >= recorder.steps) {
        throw new Errors.ModuleIndexOutOfRange({ path: "", what: "step", index: s, size: recorder.steps, site: Site.here() })
      }
      recorder.step = s
      return fn(s)
    })
    Object.defineProperty(out, perStep, { value: true })
    return out
  } finally {
    recorder.step = saved
  }
}

/**
 * What {@link record} gives: the graph and the inputs of each invoke.
 *
 * @since 0.1.0
 */
export interface Recording<I> {
  readonly graph: Graph.Graph
  readonly inputs: ReadonlyArray<I>
  /** The local functions `apply` calls (they never cross the wire). */
  readonly functions: ReadonlyArray<(...args: ReadonlyArray<never>) => unknown>
}

/**
 * The trace context `t` over a recorder. `inputs()` is the invoke input list
 * being filled; `onAll` handles `t.all()` without a callback.
 */
const makeContext = <I>(
  recorder: Recorder,
  state: {
    readonly inputs: () => Array<I>
    readonly hasInput: boolean
    readonly onAll: () => void
    readonly onInvoke?: (input: I) => void
  }
): Context<I> => {
  let inInvoke = false
  return {
    invoke: (input, body) => {
      if (inInvoke) throw new Errors.InvalidInput({ site: Site.here(), reason: "invokes cannot be nested" })
      if (state.hasInput) {
        throw new Errors.InvalidInput({
          site: Site.here(),
          reason: "this trace was given an input already; pass no input to trace() to use invokes"
        })
      }
      const inputs = state.inputs()
      const previous = recorder.invoke
      recorder.invoke = inputs.length
      inputs.push(input)
      state.onInvoke?.(input)
      recorder.invokes = inputs.length
      inInvoke = true
      try {
        return body()
      } finally {
        inInvoke = false
        recorder.invoke = previous
      }
    },
    stop: () => {
      recorder.push({ _tag: "Stop" })
    },
    cat: (items, axis = 0) => recorder.op("Concat", items, { axis }),
    constant: (value) => new TensorProxy(recorder, recorder.operand(value, Site.here())),
    next: () => recorder.nextStep(),
    cond: (predicate, then, otherwise) => recorder.cond(predicate, then, otherwise),
    list: (...items) => recorder.list(items),
    dict: () => recorder.dict(),
    apply: (fn, ...args) => recorder.apply(fn as never, args),
    log: (...args) => recorder.log(args),
    all: ((body?: (step: number) => unknown) => {
      if (body !== undefined) return eachStep(recorder, range(0, recorder.steps), body)
      state.onAll()
      return undefined
    }) as Context<I>["all"],
    iter: (steps, body) => eachStep(recorder, stepList(steps, recorder.steps), body)
  }
}

/** Records a model's edits: for every invoke's rows (invoke -1) and every step. */
const applyEdits = (recorder: Recorder, m: Envoy, edits: ReadonlyArray<(m: Envoy) => void> | undefined): void => {
  if (edits === undefined || edits.length === 0) return
  const invoke = recorder.invoke
  recorder.invoke = -1
  try {
    eachStep(recorder, range(0, recorder.steps), () => edits.forEach((e) => e(m)))
  } finally {
    recorder.invoke = invoke
  }
}

/**
 * Records a trace callback. With `input` given, the callback's reads address
 * that input (one implicit invoke); otherwise it must call `t.invoke`.
 *
 * @example
 * const { graph } = Tracer.record(tree.root, (m) => m.layer1.output, { input: x })
 *
 * @since 0.1.0
 */
export const record = <I, R>(
  root: ModuleInfo,
  fn: (m: Envoy, t: Context<I>) => R,
  options: {
    readonly input?: I
    readonly hasInput: boolean
    /** Generation steps (forward passes); default 1. */
    readonly steps?: number
    /** Extra members of the root envoy (e.g. `generator`). */
    readonly extend?: (recorder: Recorder) => Record<string, unknown>
    /** The model's edits, recorded first, for every row and step. */
    readonly edits?: ReadonlyArray<(m: Envoy) => void>
    /** Scans nodes as they are recorded, making `.shape` concrete (see `Recorder.shapeOf`). */
    readonly shapeOf?: (node: Graph.Node) => ReadonlyArray<number | string> | undefined
  }
): Recording<I> => {
  const recorder = new Recorder(root, options.steps ?? 1)
  recorder.shapeOf = options.shapeOf
  let inputs: Array<I> = []
  let allFrom: number | undefined
  const begin = () => {
    inputs = []
    recorder.invokes = 0
    if (options.hasInput) {
      inputs.push(options.input as I)
      recorder.invokes = 1
    }
  }
  begin()
  let replayStep = 0
  const t = makeContext<I>(recorder, {
    inputs: () => inputs,
    hasInput: options.hasInput,
    onAll: () => {
      if (allFrom === undefined) allFrom = recorder.nextId
      // in a replay, this is where recording for the replayed step starts
      if (replayStep > 0) {
        recorder.replayUntil = 0
        recorder.step = replayStep
      }
    }
  })
  const root$ = envoy(recorder, root)
  const extra = options.extend?.(recorder) ?? {}
  const m = Object.keys(extra).length === 0 ? root$ : new Proxy(root$, { get: (target, key) => (typeof key === "string" && key in extra ? extra[key] : (target as any)[key]) })
  applyEdits(recorder, root$, options.edits)
  const returned = fn(m, t)
  if (inputs.length === 0) {
    throw new Errors.InvalidInput({ site: Site.here(), reason: "the trace has no input: pass one to trace() or call t.invoke(input, ...)" })
  }
  let result = toResult(recorder, returned)
  // t.all() without a callback: record what follows it again for every later step
  if (allFrom !== undefined && recorder.steps > 1) {
    const firstPass = allFrom
    const perStep: Array<Graph.Result> = [result]
    for (replayStep = 1; replayStep < recorder.steps; replayStep++) {
      recorder.replay(firstPass)
      begin()
      perStep.push(toResult(recorder, fn(m, t)))
    }
    replayStep = 0
    result = mergeSteps(perStep)
  }
  return { graph: { nodes: recorder.nodes, invokes: inputs.length, result }, inputs, functions: recorder.functions }
}

/** Results of replayed passes: equal leaves stay single, differing ones become per-step lists. */
const mergeSteps = (results: ReadonlyArray<Graph.Result>): Graph.Result => {
  const [first] = results
  if (results.every((r) => JSON.stringify(r) === JSON.stringify(first))) return first
  if (first._tag === "Record" && results.every((r) => r._tag === "Record")) {
    const fields: Record<string, Graph.Result> = {}
    for (const k of Object.keys(first.fields)) {
      fields[k] = mergeSteps(results.map((r) => (r as typeof first).fields[k] ?? { _tag: "Value", value: null }))
    }
    return { _tag: "Record", fields }
  }
  if (first._tag === "List" && results.every((r) => r._tag === "List" && r.items.length === first.items.length)) {
    return { _tag: "List", items: first.items.map((_, i) => mergeSteps(results.map((r) => (r as typeof first).items[i]))) }
  }
  return { _tag: "Steps", items: [...results] }
}

const toResult = (recorder: Recorder, value: unknown): Graph.Result => {
  if (value instanceof TensorProxy) return { _tag: "Ref", id: recorder.operand(value, "") }
  if (value instanceof Tensor) return { _tag: "Ref", id: recorder.operand(value, "") }
  if (Array.isArray(value)) {
    return { _tag: perStep in value ? "Steps" : "List", items: value.map((v) => toResult(recorder, v)) }
  }
  if (value !== null && typeof value === "object") {
    const fields: Record<string, Graph.Result> = {}
    for (const [k, v] of Object.entries(value)) fields[k] = toResult(recorder, v)
    return { _tag: "Record", fields }
  }
  if (value === undefined) return { _tag: "Value", value: null }
  if (typeof value === "bigint") return { _tag: "Value", value: Number(value) }
  return { _tag: "Value", value: value as string | number | boolean | null }
}

/**
 * The type a trace result has once run: proxies become `Tensor`s.
 *
 * @since 0.1.0
 */
export type Saved<R> = R extends ListProxy
  ? ReadonlyArray<unknown>
  : R extends DictProxy
  ? Readonly<Record<string, unknown>>
  : R extends TensorProxy
  ? Tensor
  : R extends Tensor
    ? Tensor
    : R extends ReadonlyArray<unknown>
      ? { readonly [K in keyof R]: Saved<R[K]> }
      : R extends (...args: ReadonlyArray<never>) => unknown
        ? R
        : R extends object
          ? { readonly [K in keyof R]: Saved<R[K]> }
          : R

/**
 * The `generator` member of a generation's root envoy: `generator.output` is
 * the token ids, one node per invoke (also when `t.all()` records the
 * callback again).
 *
 * @since 0.1.0
 */
export const generatorEnvoy = (recorder: Recorder): { readonly generator: { readonly output: TensorProxy } } => {
  const ids = new Map<number, number>()
  return {
    generator: {
      get output() {
        let id = ids.get(recorder.invoke)
        if (id === undefined || recorder.replaying()) {
          id = recorder.push({ _tag: "Generated", invoke: recorder.invoke })
          ids.set(recorder.invoke, id)
        }
        return new TensorProxy(recorder, id)
      }
    }
  }
}

/**
 * The session context `s` (`model.session((s) => ...)`): several traces and
 * the graph-side control flow and values around them, all one graph.
 *
 * @since 0.1.0
 */
export interface SessionContext<I> {
  /** A trace of the model inside the session; values flow to and from it. */
  trace<R>(input: I | TensorProxy, fn: (m: Envoy, t: Context<I>) => R): R
  trace<R>(fn: (m: Envoy, t: Context<I>) => R): R
  /** Runs `fn` once per item of `over` (an array, a graph-side list, a tensor's rows). */
  iter(over: Operand, fn: (item: TensorProxy) => void): void
  /** Runs `then` when `predicate` holds, else `otherwise`. */
  cond(predicate: Operand, then: () => void, otherwise?: () => void): void
  /** A graph-side list. */
  list(...items: ReadonlyArray<Operand>): ListProxy
  /** A graph-side dictionary. */
  dict(): DictProxy
  /** Runs a local TypeScript function on values when the session runs. */
  apply<A extends ReadonlyArray<unknown>>(fn: (...args: A) => unknown, ...args: ReadonlyArray<Operand>): TensorProxy
  /** Prints values when the session runs. */
  log(...args: ReadonlyArray<Operand>): void
  /** Ends the innermost loop, or the session at its top level. */
  stop(): void
  /** A constant in the graph. */
  constant(value: Operand): TensorProxy
  /**
   * A variable that `set`/`update` replace for the rest of the session, and
   * whose gradient `.grad` reads (weights trained inside a session).
   */
  variable(initial: Operand): VariableProxy
}

/**
 * A recorded session: its graph, and the local functions `apply` uses.
 *
 * @since 0.1.0
 */
export interface SessionRecording {
  readonly graph: Graph.Graph
  readonly functions: ReadonlyArray<(...args: ReadonlyArray<never>) => unknown>
}

/**
 * Records a session callback.
 *
 * @example
 * const { graph } = Tracer.recordSession(tree.root, (s) => { s.trace(x, (m) => m.layer1.output) })
 *
 * @since 0.1.0
 */
export const recordSession = <I, R>(
  root: ModuleInfo,
  fn: (s: SessionContext<I>) => R,
  edits?: ReadonlyArray<(m: Envoy) => void>
): SessionRecording => {
  const recorder = new Recorder(root, 1)
  recorder.inTrace = false
  /** An input recorded at session level, before the trace that uses it. */
  const outerInput = (input: unknown, site: Site.Lazy): number => {
    if (input instanceof TensorProxy) return input.id
    if (input instanceof Tensor || typeof input !== "object" || input === null || Array.isArray(input)) {
      return recorder.operand(input as Operand, site)
    }
    const dict = recorder.dict()
    for (const [k, v] of Object.entries(input)) dict.put(k, v as Operand)
    return dict.id
  }
  const s: SessionContext<I> = {
    trace: ((a: unknown, b?: unknown) => {
      const site = Site.capture()
      const [input, body, hasInput] = typeof a === "function" ? [undefined, a, false] : [a, b, true]
      const traceFn = body as (m: Envoy, t: Context<I>) => unknown
      // inputs of invokes are recorded at session level, before the trace
      const inputIds: Array<number> = hasInput ? [outerInput(input, site)] : []
      const inputs: Array<I> = hasInput ? [input as I] : []
      const invokeInputs: Array<unknown> = []
      let returned: unknown
      let nodes: ReadonlyArray<Graph.Node> = []
      const saved = { invoke: recorder.invoke, invokes: recorder.invokes, step: recorder.step }
      recorder.invoke = 0
      recorder.invokes = inputs.length
      recorder.step = 0
      const traceId = recorder.nested(
        (id) => ({ _tag: "Trace", id, site: Site.format(site), inputs: inputIds, steps: 1, options: null, body: nodes }),
        () => {
          nodes = recorder.block(() => {
            recorder.inTrace = true
            try {
              const t = makeContext<I>(recorder, {
                inputs: () => inputs,
                hasInput,
                onAll: () => undefined,
                onInvoke: (i) => invokeInputs.push(i)
              })
              const m = envoy(recorder, root)
              applyEdits(recorder, m, edits)
              returned = traceFn(m, t)
            } finally {
              recorder.inTrace = false
            }
          })
        }
      )
      // the invokes' inputs go before the trace node in the session's list
      const list = recorder.current()
      const before = list.length
      for (const i of invokeInputs) inputIds.push(outerInput(i, site))
      const moved = list.splice(before)
      const at = list.findIndex((n) => n._tag === "Trace" && n.id === traceId)
      list.splice(at, 0, ...moved)
      recorder.invoke = saved.invoke
      recorder.invokes = saved.invokes
      recorder.step = saved.step
      if (inputIds.length === 0) {
        throw new Errors.InvalidInput({ site: Site.format(site), reason: "the trace has no input: pass one to s.trace() or call t.invoke(input, ...)" })
      }
      return returned
    }) as SessionContext<I>["trace"],
    iter: (over, body) => {
      const site = Site.capture()
      const o = recorder.operand(over, site)
      let nodes: ReadonlyArray<Graph.Node> = []
      recorder.nested(
        (id) => ({ _tag: "Iter", id, site: Site.format(site), over: o, body: nodes }),
        () => {
          const id = recorder.nextId - 1
          nodes = recorder.block(() => body(new TensorProxy(recorder, id)))
        }
      )
    },
    cond: (predicate, then, otherwise) => recorder.cond(predicate, then, otherwise),
    list: (...items) => recorder.list(items),
    dict: () => recorder.dict(),
    apply: (f, ...args) => recorder.apply(f as never, args),
    log: (...args) => recorder.log(args),
    stop: () => {
      recorder.push({ _tag: "Stop" })
    },
    constant: (value) => new TensorProxy(recorder, recorder.operand(value, Site.here())),
    variable: (initial) => {
      const site = Site.here()
      // a variable is its own node: assigning to it never changes the value it started from
      const id = initial instanceof TensorProxy ? initial.clone().id : recorder.operand(initial, site)
      return new VariableProxy(recorder, id)
    }
  }
  const returned = fn(s)
  const result = toResult(recorder, returned)
  return { graph: { nodes: recorder.nodes, invokes: 0, result }, functions: recorder.functions }
}
