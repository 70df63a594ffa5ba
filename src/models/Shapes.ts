/**
 * Shape and element-type inference over ONNX graphs, on *fake tensors*:
 * a dtype, a shape whose dimensions are numbers or symbolic expressions, and,
 * for small tensors, their known contents (so that the shape arithmetic
 * exporters write, `Shape -> Gather -> Concat -> Reshape`, folds).
 *
 * - **Symbolic dimensions** ({@link Dim}) are numbers or polynomials with
 *   integer coefficients over named symbols (`batch_size`,
 *   `sequence_length`, ...), kept in a normal form: two dims are equal
 *   exactly when their normal forms are ({@link dimEquals}). They print as
 *   `past_sequence_length+sequence_length`, `2*sequence_length-1`. A
 *   division that is not exact gives an opaque atom (`(sequence_length)//2`),
 *   itself a symbol. Symbols are assumed non-negative.
 * - **Rules** live in a typed table ({@link rules}) keyed by operator name
 *   (`satisfies Record<OnnxOpName, Rule>`): adding a name to
 *   {@link opNames} without a rule is a compile error; a graph using an
 *   operator without one fails with {@link UnknownOperator} naming it.
 * - **Cost**: no per-element work on big tensors. Contents are tracked only
 *   for tensors of at most {@link maxValueSize} elements with concrete
 *   shapes; of initializers only their dims are read, and the data of small
 *   ones.
 *
 * Where a symbolic shape leaves a fact undecided, inference assumes the
 * model is used as intended: slice bounds lie within their dimension, a
 * symbolic dimension broadcast against a number `n != 1` equals `n`, a
 * symbolic dimension is not 1 for `Squeeze` without axes, and an `If` whose
 * condition is not known takes its `then` branch. Concrete inputs make every
 * such fact concrete, and then inference matches onnxruntime exactly.
 *
 * @example
 * import * as Shapes from "./Shapes.js"
 * const seq = Shapes.symbol("sequence_length")
 * const fakes = Shapes.inferModel(model, {
 *   input_ids: { dtype: "int64", shape: [1, seq] }
 * })
 * Shapes.format(fakes.get("logits")!)       // "float32[1, sequence_length, 512]"
 *
 * @since 0.1.0
 */
import { Data } from "effect"
import * as DType from "../core/DType.js"
import * as Onnx from "./Onnx.js"

// ---------------------------------------------------------------------------
// Symbolic dimensions
// ---------------------------------------------------------------------------

/**
 * One term of a polynomial: a coefficient times a product of atoms (sorted, with repeats).
 *
 * @since 0.1.0
 */
export interface Term {
  readonly coef: number
  readonly atoms: ReadonlyArray<string>
}

/** monomial key -> term */
type Poly = Map<string, Term>

const SEP = "\u0001"
const monoKey = (atoms: ReadonlyArray<string>): string => atoms.join(SEP)

/**
 * A symbolic dimension in normal form: a polynomial over named symbols that
 * is not a constant (constants are plain numbers). Compare with
 * {@link dimEquals}; `text` is the normal form printed.
 *
 * @example
 * const d = Shapes.add(Shapes.symbol("past_sequence_length"), Shapes.symbol("sequence_length"))
 * String(d) // "past_sequence_length+sequence_length"
 *
 * @since 0.1.0
 */
export class Expr {
  readonly _tag = "Expr"
  /** @internal */
  constructor(
    /** @internal */
    readonly terms: ReadonlyArray<Term>,
    readonly text: string
  ) {}
  toString(): string {
    return this.text
  }
  toJSON(): string {
    return this.text
  }
}

/**
 * A dimension (or a known element of an integer tensor): a number, or a
 * symbolic expression.
 *
 * @since 0.1.0
 */
export type Dim = number | Expr

const degreeOf = (t: Term) => t.atoms.length

/** Graded lexicographic order on monomials (symbols ordered by name); positive: a > b. */
const compareMono = (a: ReadonlyArray<string>, b: ReadonlyArray<string>): number => {
  if (a.length !== b.length) return a.length - b.length
  // exponent vectors compared variable by variable, smallest name first
  let i = 0
  let j = 0
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) {
      i++
      j++
      continue
    }
    // the smaller name is the earlier variable: whoever has it has the larger exponent there
    return a[i] < b[j] ? 1 : -1
  }
  return 0
}

const needsParens = (atom: string) => !/^[A-Za-z_][\w.:/]*$/.test(atom) && !/^\(.*\)$/.test(atom) && !/^\w+\(.*\)$/.test(atom)

const formatTerm = (t: Term, first: boolean): string => {
  const sign = t.coef < 0 ? "-" : first ? "" : "+"
  const c = Math.abs(t.coef)
  const body = t.atoms.map((a) => (needsParens(a) ? `(${a})` : a)).join("*")
  if (body === "") return `${sign}${c}`
  return `${sign}${c === 1 ? "" : `${c}*`}${body}`
}

const fromPoly = (p: Poly): Dim => {
  const terms = [...p.values()].filter((t) => t.coef !== 0)
  if (terms.length === 0) return 0
  if (terms.length === 1 && terms[0].atoms.length === 0) return terms[0].coef
  terms.sort((x, y) => -compareMono(x.atoms, y.atoms))
  const text = terms.map((t, k) => formatTerm(t, k === 0)).join("")
  return new Expr(terms, text)
}

const toPoly = (d: Dim): Poly => {
  const p: Poly = new Map()
  if (typeof d === "number") {
    if (d !== 0) p.set("", { coef: d, atoms: [] })
  } else for (const t of d.terms) p.set(monoKey(t.atoms), t)
  return p
}

const addInto = (p: Poly, t: Term) => {
  const k = monoKey(t.atoms)
  const old = p.get(k)
  const coef = (old?.coef ?? 0) + t.coef
  if (coef === 0) p.delete(k)
  else p.set(k, { coef, atoms: t.atoms })
}

const mulAtoms = (a: ReadonlyArray<string>, b: ReadonlyArray<string>) => [...a, ...b].sort()

/**
 * A named symbol.
 *
 * @example
 * Shapes.symbol("batch_size")
 *
 * @since 0.1.0
 */
export const symbol = (name: string): Dim => new Expr([{ coef: 1, atoms: [name] }], needsParens(name) ? `(${name})` : name)

/**
 * Whether a dim is symbolic.
 *
 * @since 0.1.0
 */
export const isSymbolic = (d: Dim): d is Expr => typeof d !== "number"

/**
 * Equality of dims by normal form.
 *
 * @example
 * Shapes.dimEquals(Shapes.parseDim("a+b"), Shapes.parseDim("b+a")) // true
 *
 * @since 0.1.0
 */
export const dimEquals = (a: Dim, b: Dim): boolean =>
  typeof a === "number" || typeof b === "number" ? a === b : a.text === b.text

/**
 * `a + b`.
 *
 * @since 0.1.0
 */
export const add = (a: Dim, b: Dim): Dim => {
  if (typeof a === "number" && typeof b === "number") return a + b
  const p = toPoly(a)
  for (const t of toPoly(b).values()) addInto(p, t)
  return fromPoly(p)
}

/**
 * `-a`.
 *
 * @since 0.1.0
 */
export const neg = (a: Dim): Dim => (typeof a === "number" ? -a : fromPoly(new Map([...a.terms].map((t) => [monoKey(t.atoms), { coef: -t.coef, atoms: t.atoms }]))))

/**
 * `a - b`.
 *
 * @since 0.1.0
 */
export const sub = (a: Dim, b: Dim): Dim => (typeof a === "number" && typeof b === "number" ? a - b : add(a, neg(b)))

/**
 * `a * b`.
 *
 * @since 0.1.0
 */
export const mul = (a: Dim, b: Dim): Dim => {
  if (typeof a === "number" && typeof b === "number") return a * b
  const p: Poly = new Map()
  for (const x of toPoly(a).values()) for (const y of toPoly(b).values()) addInto(p, { coef: x.coef * y.coef, atoms: mulAtoms(x.atoms, y.atoms) })
  return fromPoly(p)
}

/**
 * The product of dims (1 for none).
 *
 * @since 0.1.0
 */
export const product = (ds: ReadonlyArray<Dim>): Dim => ds.reduce<Dim>((acc, d) => mul(acc, d), 1)

const leading = (p: Poly): Term => {
  let best: Term | undefined
  for (const t of p.values()) if (best === undefined || compareMono(t.atoms, best.atoms) > 0) best = t
  return best!
}

/** `atoms(a) / atoms(b)` when b's atoms are a sub-multiset of a's. */
const divAtoms = (a: ReadonlyArray<string>, b: ReadonlyArray<string>): ReadonlyArray<string> | undefined => {
  const rest = [...a]
  for (const x of b) {
    const k = rest.indexOf(x)
    if (k < 0) return undefined
    rest.splice(k, 1)
  }
  return rest
}

/**
 * `a / b` when `b` divides `a` exactly (as polynomials), else `undefined`.
 *
 * @example
 * Shapes.divExact(Shapes.parseDim("4*s*b"), Shapes.parseDim("b")) // 4*s
 *
 * @since 0.1.0
 */
export const divExact = (a: Dim, b: Dim): Dim | undefined => {
  if (typeof b === "number") {
    if (b === 0) return undefined
    if (typeof a === "number") return a % b === 0 ? a / b : undefined
    if (!a.terms.every((t) => t.coef % b === 0)) return undefined
    return fromPoly(new Map(a.terms.map((t) => [monoKey(t.atoms), { coef: t.coef / b, atoms: t.atoms }])))
  }
  const r = toPoly(a)
  const q = toPoly(b)
  const lq = leading(q)
  const quotient: Poly = new Map()
  for (let guard = 0; r.size > 0; guard++) {
    if (guard > 256) return undefined
    const lr = leading(r)
    const atoms = divAtoms(lr.atoms, lq.atoms)
    if (atoms === undefined || lr.coef % lq.coef !== 0) return undefined
    const t: Term = { coef: lr.coef / lq.coef, atoms }
    addInto(quotient, t)
    for (const y of q.values()) addInto(r, { coef: -t.coef * y.coef, atoms: mulAtoms(t.atoms, y.atoms) })
  }
  return fromPoly(quotient)
}

/**
 * What is known of the sign of a dim, symbols being non-negative:
 * `"pos"`, `"neg"`, `"zero"`, `"nonneg"`, `"nonpos"`, or `undefined`.
 *
 * @since 0.1.0
 */
export const signOf = (d: Dim): "pos" | "neg" | "zero" | "nonneg" | "nonpos" | undefined => {
  if (typeof d === "number") return d > 0 ? "pos" : d < 0 ? "neg" : "zero"
  const constant = d.terms.find((t) => t.atoms.length === 0)?.coef ?? 0
  const vars = d.terms.filter((t) => t.atoms.length > 0)
  if (vars.every((t) => t.coef > 0)) return constant > 0 ? "pos" : constant === 0 ? "nonneg" : undefined
  if (vars.every((t) => t.coef < 0)) return constant < 0 ? "neg" : constant === 0 ? "nonpos" : undefined
  return undefined
}

/**
 * `a < b` when decidable (symbols non-negative), else `undefined`.
 *
 * @since 0.1.0
 */
export const lessThan = (a: Dim, b: Dim): boolean | undefined => {
  const s = signOf(sub(a, b))
  return s === "neg" ? true : s === "pos" || s === "zero" || s === "nonneg" ? false : undefined
}

/**
 * Whether `a == b` is decidable and its answer (symbols non-negative).
 *
 * @since 0.1.0
 */
export const decideEqual = (a: Dim, b: Dim): boolean | undefined => {
  if (dimEquals(a, b)) return true
  const s = signOf(sub(a, b))
  return s === "pos" || s === "neg" ? false : undefined
}

const opaque = (text: string): Dim => symbol(text)

/**
 * Floor division `a // b` (exact when `b` divides `a`; an opaque symbol
 * `(a)//b` when symbolic and not exact).
 *
 * @since 0.1.0
 */
export const floorDiv = (a: Dim, b: Dim): Dim => {
  if (typeof a === "number" && typeof b === "number") return Math.floor(a / b)
  const q = divExact(a, b)
  if (q !== undefined) return q
  return opaque(`(${formatDim(a)})//${typeof b === "number" ? b : `(${formatDim(b)})`}`)
}

/**
 * Ceiling division.
 *
 * @since 0.1.0
 */
export const ceilDiv = (a: Dim, b: Dim): Dim => {
  if (typeof a === "number" && typeof b === "number") return Math.ceil(a / b)
  const q = divExact(a, b)
  if (q !== undefined) return q
  return floorDiv(add(a, sub(b, 1)), b)
}

/**
 * The smaller of two dims (an opaque `min(a,b)` when undecidable).
 *
 * @since 0.1.0
 */
export const min = (a: Dim, b: Dim): Dim => {
  if (typeof a === "number" && typeof b === "number") return Math.min(a, b)
  const lt = lessThan(a, b)
  if (lt === true) return a
  const s = signOf(sub(a, b))
  if (s === "zero" || s === "pos" || s === "nonneg") return b
  if (s === "nonpos") return a
  const [x, y] = [formatDim(a), formatDim(b)].sort()
  return opaque(`min(${x},${y})`)
}

/**
 * The larger of two dims (an opaque `max(a,b)` when undecidable).
 *
 * @since 0.1.0
 */
export const max = (a: Dim, b: Dim): Dim => {
  if (typeof a === "number" && typeof b === "number") return Math.max(a, b)
  const s = signOf(sub(a, b))
  if (s === "pos" || s === "zero" || s === "nonneg") return a
  if (s === "neg" || s === "nonpos") return b
  const [x, y] = [formatDim(a), formatDim(b)].sort()
  return opaque(`max(${x},${y})`)
}

/**
 * A dim printed in normal form.
 *
 * @since 0.1.0
 */
export const formatDim = (d: Dim): string => (typeof d === "number" ? String(d) : d.text)

/**
 * Parses a polynomial dim: integers, names (`[A-Za-z_][\w.]*`), `+`, `-`, `*`.
 *
 * @example
 * Shapes.parseDim("past_sequence_length+sequence_length")
 * Shapes.parseDim("2*batch_size*sequence_length-1")
 *
 * @since 0.1.0
 */
export const parseDim = (text: string): Dim => {
  const tokens = text.replace(/\s+/g, "").match(/\d+|[A-Za-z_][\w.]*|[+\-*]/g) ?? []
  if (tokens.join("") !== text.replace(/\s+/g, "")) throw new Error(`cannot parse dimension "${text}"`)
  let acc: Dim = 0
  let k = 0
  while (k < tokens.length) {
    let sign = 1
    while (tokens[k] === "+" || tokens[k] === "-") sign *= tokens[k++] === "-" ? -1 : 1
    let term: Dim = sign
    for (;;) {
      const t = tokens[k++]
      if (t === undefined) throw new Error(`cannot parse dimension "${text}"`)
      term = mul(term, /^\d+$/.test(t) ? Number(t) : symbol(t))
      if (tokens[k] !== "*") break
      k++
    }
    acc = add(acc, term)
  }
  return acc
}

/**
 * Substitutes values for symbols (numbers or dims); symbols without a
 * binding, and opaque atoms, stay.
 *
 * @example
 * Shapes.substitute(Shapes.parseDim("p+s"), { p: 0, s: 7 }) // 7
 *
 * @since 0.1.0
 */
export const substitute = (d: Dim, bindings: Readonly<Record<string, Dim>>): Dim => {
  if (typeof d === "number") return d
  let acc: Dim = 0
  for (const t of d.terms) {
    let term: Dim = t.coef
    for (const a of t.atoms) term = mul(term, Object.prototype.hasOwnProperty.call(bindings, a) ? bindings[a] : symbol(a))
    acc = add(acc, term)
  }
  return acc
}

/**
 * Turns a number, a symbol name or an expression text into a dim.
 *
 * @since 0.1.0
 */
export const toDim = (d: Dim | string): Dim => (typeof d === "string" ? parseDim(d) : d)

// ---------------------------------------------------------------------------
// Fake tensors
// ---------------------------------------------------------------------------

/**
 * A fake tensor: dtype, (symbolic) shape, and, for small tensors whose shape
 * is concrete, the known contents in row-major order (integers as dims,
 * bools as 0/1, floats as numbers).
 *
 * @example
 * const ids: Shapes.Fake = { dtype: "int64", shape: [1, Shapes.symbol("sequence_length")] }
 *
 * @since 0.1.0
 */
export interface Fake {
  readonly dtype: DType.DType
  readonly shape: ReadonlyArray<Dim>
  readonly value?: ReadonlyArray<Dim>
}

/**
 * Contents are tracked for tensors of at most this many elements.
 *
 * @since 0.1.0
 */
export const maxValueSize = 64

/**
 * A fake tensor printed: `float32[batch_size, sequence_length, 64]`.
 *
 * @since 0.1.0
 */
export const format = (f: Fake): string => `${f.dtype}[${f.shape.map(formatDim).join(", ")}]`

/**
 * Whether two shapes are equal (by normal form).
 *
 * @since 0.1.0
 */
export const shapeEquals = (a: ReadonlyArray<Dim>, b: ReadonlyArray<Dim>): boolean =>
  a.length === b.length && a.every((d, i) => dimEquals(d, b[i]))

/**
 * The shape as numbers, when it is concrete.
 *
 * @since 0.1.0
 */
export const concrete = (shape: ReadonlyArray<Dim>): ReadonlyArray<number> | undefined =>
  shape.every((d): d is number => typeof d === "number") ? (shape as ReadonlyArray<number>) : undefined

/**
 * A fake tensor, keeping `value` only when the shape is concrete and small.
 *
 * @since 0.1.0
 */
export const fake = (dtype: DType.DType, shape: ReadonlyArray<Dim>, value?: ReadonlyArray<Dim | undefined>): Fake => {
  if (value === undefined || dtype === "string") return { dtype, shape }
  const c = concrete(shape)
  if (c === undefined || c.reduce((a, b) => a * b, 1) !== value.length || value.length > maxValueSize) return { dtype, shape }
  if (value.some((v) => v === undefined)) return { dtype, shape }
  return { dtype, shape, value: value as ReadonlyArray<Dim> }
}

/**
 * The fake of a real tensor's dtype and dims (no contents).
 *
 * @since 0.1.0
 */
export const of = (t: { readonly dtype: DType.DType; readonly shape: ReadonlyArray<number> }): Fake => ({ dtype: t.dtype, shape: [...t.shape] })

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/**
 * An operator the graph uses that has no shape rule.
 *
 * @since 0.1.0
 */
export class UnknownOperator extends Data.TaggedError("UnknownOperator")<{
  readonly opType: string
  readonly domain: string
  readonly node: string
}> {
  override get message(): string {
    return `no shape rule for operator ${this.domain === "" ? "" : this.domain + "."}${this.opType} (node "${this.node}")`
  }
}

/**
 * Shapes or types that do not fit an operator (wrong inner size of a
 * MatMul, shapes that do not broadcast, an index past a dimension), or a
 * fact inference needs but cannot know (a Reshape target computed from
 * data). `node` is "" for intervention operations.
 *
 * @since 0.1.0
 */
export class ShapeError extends Data.TaggedError("ShapeError")<{
  readonly opType: string
  readonly node: string
  readonly reason: string
}> {
  override get message(): string {
    return `${this.opType}${this.node === "" ? "" : ` (node "${this.node}")`}: ${this.reason}`
  }
}

const fail = (opType: string, reason: string): never => {
  throw new ShapeError({ opType, node: "", reason })
}

const showShape = (s: ReadonlyArray<Dim>) => `[${s.map(formatDim).join(", ")}]`

// ---------------------------------------------------------------------------
// Shape primitives (shared by the ONNX rules and the intervention ops)
// ---------------------------------------------------------------------------

/**
 * Normalizes an axis against a rank (negative counts from the end).
 *
 * @since 0.1.0
 */
export const normAxis = (axis: number, rank: number, opType = "axis"): number => {
  const a = axis < 0 ? axis + rank : axis
  if (!Number.isInteger(a) || a < 0 || a >= Math.max(rank, 1)) fail(opType, `axis ${axis} is out of range for a tensor of rank ${rank}`)
  return a
}

const broadcastDim = (a: Dim, b: Dim, opType: string, sa: ReadonlyArray<Dim>, sb: ReadonlyArray<Dim>): Dim => {
  if (dimEquals(a, b)) return a
  if (a === 1) return b
  if (b === 1) return a
  if (typeof a === "number" && typeof b === "number") {
    return fail(opType, `shapes ${showShape(sa)} and ${showShape(sb)} do not broadcast`)
  }
  if (typeof a === "number") return a
  if (typeof b === "number") return b
  // two different symbolic sizes: one of them is 1 or they are equal; keep the richer
  return b.terms.length > a.terms.length ? b : a
}

/**
 * NumPy broadcasting of several shapes.
 *
 * @example
 * Shapes.broadcast([[2, 1, 4], [3, 1]]) // [2, 3, 4]
 *
 * @since 0.1.0
 */
export const broadcast = (shapes: ReadonlyArray<ReadonlyArray<Dim>>, opType = "broadcast"): ReadonlyArray<Dim> => {
  let out: ReadonlyArray<Dim> = shapes[0] ?? []
  for (let k = 1; k < shapes.length; k++) {
    const s = shapes[k]
    const rank = Math.max(out.length, s.length)
    const a = [...new Array<Dim>(rank - out.length).fill(1), ...out]
    const b = [...new Array<Dim>(rank - s.length).fill(1), ...s]
    out = a.map((d, i) => broadcastDim(d, b[i], opType, out, s))
  }
  return out
}

/**
 * Whether `value` broadcasts to exactly `target` (one-directional, as an
 * assignment needs), and if not, why.
 *
 * @since 0.1.0
 */
export const broadcastsTo = (value: ReadonlyArray<Dim>, target: ReadonlyArray<Dim>): string | undefined => {
  if (value.length > target.length) return `a value of shape ${showShape(value)} cannot be assigned to a selection of shape ${showShape(target)}`
  const v = [...new Array<Dim>(target.length - value.length).fill(1), ...value]
  for (let i = 0; i < target.length; i++) {
    if (v[i] === 1 || dimEquals(v[i], target[i])) continue
    if (typeof v[i] === "number" && typeof target[i] === "number") {
      return `a value of shape ${showShape(value)} does not broadcast to the selection's shape ${showShape(target)}`
    }
    if (decideEqual(v[i], target[i]) === false && typeof v[i] === "number") {
      return `a value of shape ${showShape(value)} does not broadcast to the selection's shape ${showShape(target)}`
    }
  }
  return undefined
}

/**
 * The shape of NumPy's `matmul(a, b)` (1-D operands promoted and dropped,
 * batch dims broadcast); a wrong inner size fails.
 *
 * @example
 * Shapes.matmul([2, 5, 64], [64, 10]) // [2, 5, 10]
 *
 * @since 0.1.0
 */
export const matmul = (a: ReadonlyArray<Dim>, b: ReadonlyArray<Dim>, opType = "MatMul"): ReadonlyArray<Dim> => {
  if (a.length === 0 || b.length === 0) fail(opType, `matmul needs tensors of rank >= 1, got shapes ${showShape(a)} and ${showShape(b)}`)
  const a2 = a.length === 1 ? [1, a[0]] : a
  const b2 = b.length === 1 ? [b[0], 1] : b
  const k1 = a2[a2.length - 1]
  const k2 = b2[b2.length - 2]
  if (!dimEquals(k1, k2) && (typeof k1 === "number" && typeof k2 === "number" ? true : decideEqual(k1, k2) === false)) {
    fail(opType, `inner dimensions do not match: shapes ${showShape(a)} and ${showShape(b)} (${formatDim(k1)} != ${formatDim(k2)})`)
  }
  const batch = broadcast([a2.slice(0, -2), b2.slice(0, -2)], opType)
  const out = [...batch, a2[a2.length - 2], b2[b2.length - 1]]
  if (a.length === 1) out.splice(out.length - 2, 1)
  if (b.length === 1) out.splice(out.length - 1, 1)
  return out
}

/**
 * The shape of a reshape to `target` (`-1` inferred; with `allowZero`
 * false a `0` copies the input's dimension, as ONNX Reshape does).
 *
 * @since 0.1.0
 */
export const reshape = (
  shape: ReadonlyArray<Dim>,
  target: ReadonlyArray<Dim>,
  options: { readonly zeroCopies: boolean; readonly opType?: string } = { zeroCopies: true }
): ReadonlyArray<Dim> => {
  const opType = options.opType ?? "Reshape"
  const dims = target.map((d, i) => (options.zeroCopies && d === 0 ? (i < shape.length ? shape[i] : fail(opType, `0 at position ${i} has no input dimension to copy`)) : d))
  const holes = dims.filter((d) => d === -1).length
  if (holes > 1) fail(opType, `reshape to ${showShape(target)} has more than one -1`)
  const size = product(shape)
  const known = product(dims.filter((d) => d !== -1))
  let out: ReadonlyArray<Dim> = dims
  if (holes === 1) {
    const q = divExact(size, known)
    if (q === undefined) {
      if (typeof size === "number" && typeof known === "number") {
        fail(opType, `cannot reshape a tensor of shape ${showShape(shape)} (${size} elements) to ${showShape(target)}`)
      }
      out = dims.map((d) => (d === -1 ? floorDiv(size, known) : d))
    } else out = dims.map((d) => (d === -1 ? q : d))
  } else {
    const total = product(dims)
    if (!dimEquals(total, size) && (typeof total === "number" && typeof size === "number" ? true : decideEqual(total, size) === false)) {
      fail(opType, `cannot reshape a tensor of shape ${showShape(shape)} (${formatDim(size)} elements) to ${showShape(target)}`)
    }
  }
  for (const d of out) if (typeof d === "number" && (d < 0 || !Number.isInteger(d))) fail(opType, `invalid target shape ${showShape(target)}`)
  return out
}

/**
 * The shape of a transpose by `perm` (default: reversed).
 *
 * @since 0.1.0
 */
export const transpose = (shape: ReadonlyArray<Dim>, perm?: ReadonlyArray<number>, opType = "Transpose"): ReadonlyArray<Dim> => {
  const rank = shape.length
  const p = perm ?? shape.map((_, i) => rank - 1 - i)
  if (p.length !== rank) fail(opType, `permutation [${p}] does not fit a tensor of rank ${rank}`)
  const n = p.map((a) => normAxis(a, rank, opType))
  if (new Set(n).size !== rank) fail(opType, `[${p}] is not a permutation`)
  return n.map((a) => shape[a])
}

/**
 * The shape after inserting size-1 axes (positions in the output).
 *
 * @since 0.1.0
 */
export const unsqueeze = (shape: ReadonlyArray<Dim>, axes: ReadonlyArray<number>, opType = "Unsqueeze"): ReadonlyArray<Dim> => {
  const rank = shape.length + axes.length
  const n = axes.map((a) => normAxis(a, rank, opType)).sort((x, y) => x - y)
  if (new Set(n).size !== n.length) fail(opType, `repeated axes [${axes}]`)
  const out = [...shape]
  for (const a of n) out.splice(a, 0, 1)
  return out
}

/**
 * The shape after removing size-1 axes (all of them without `axes`).
 *
 * @since 0.1.0
 */
export const squeeze = (shape: ReadonlyArray<Dim>, axes: ReadonlyArray<number> | undefined, opType = "Squeeze"): ReadonlyArray<Dim> => {
  if (axes === undefined) return shape.filter((d) => d !== 1)
  const n = axes.map((a) => normAxis(a, shape.length, opType))
  for (const a of n) {
    const d = shape[a]
    if (typeof d === "number" && d !== 1) fail(opType, `cannot squeeze dimension ${a} of size ${d} (shape ${showShape(shape)})`)
  }
  return shape.filter((_, i) => !n.includes(i))
}

/**
 * The shape of a reduction over `axes` (all without).
 *
 * @since 0.1.0
 */
export const reduce = (shape: ReadonlyArray<Dim>, axes: ReadonlyArray<number> | undefined, keepdims: boolean, opType = "Reduce"): ReadonlyArray<Dim> => {
  const n = axes === undefined || axes.length === 0 ? shape.map((_, i) => i) : axes.map((a) => normAxis(a, shape.length, opType))
  return keepdims ? shape.map((d, i) => (n.includes(i) ? 1 : d)) : shape.filter((_, i) => !n.includes(i))
}

/**
 * The shape of a concatenation along `axis`.
 *
 * @since 0.1.0
 */
export const concat = (shapes: ReadonlyArray<ReadonlyArray<Dim>>, axis: number, opType = "Concat"): ReadonlyArray<Dim> => {
  const rank = shapes[0].length
  const a = normAxis(axis, rank, opType)
  for (const s of shapes) {
    if (s.length !== rank) fail(opType, `cannot concatenate tensors of shapes ${shapes.map(showShape).join(", ")}: ranks differ`)
    for (let i = 0; i < rank; i++) {
      if (i === a || dimEquals(s[i], shapes[0][i])) continue
      if (typeof s[i] === "number" && typeof shapes[0][i] === "number") {
        fail(opType, `cannot concatenate tensors of shapes ${shapes.map(showShape).join(", ")} along axis ${axis}: dimension ${i} differs`)
      }
    }
  }
  const out = [...shapes[0]]
  out[a] = shapes.reduce<Dim>((acc, s) => add(acc, s[a]), 0)
  return out
}

/**
 * The length of the Python slice `start:stop:step` of a dimension of size
 * `size` (bounds clamped; with symbolic sizes, bounds are assumed in range).
 * `start`/`stop` undefined are open.
 *
 * @since 0.1.0
 */
export const sliceLength = (size: Dim, start: Dim | undefined, stop: Dim | undefined, step: number): { readonly start: Dim; readonly count: Dim } => {
  const huge = (d: Dim | undefined) => typeof d === "number" && Math.abs(d) >= 2 ** 52
  const wrap = (d: Dim): Dim => (signOf(d) === "neg" ? add(d, size) : d)
  // clamp x into [lo, hi] where decidable
  const clamp = (x: Dim, lo: Dim, hi: Dim): Dim => {
    if (lessThan(x, lo) === true) return lo
    if (lessThan(hi, x) === true) return hi
    return x
  }
  let s: Dim
  let e: Dim
  if (step > 0) {
    s = start === undefined ? 0 : huge(start) ? ((start as number) > 0 ? size : 0) : clamp(wrap(start), 0, size)
    e = stop === undefined ? size : huge(stop) ? ((stop as number) > 0 ? size : 0) : clamp(wrap(stop), 0, size)
    const len = sub(e, s)
    const count = signOf(len) === "neg" || signOf(len) === "nonpos" ? 0 : step === 1 ? len : ceilDiv(len, step)
    return { start: s, count: typeof count === "number" ? Math.max(0, count) : count }
  }
  s = start === undefined ? sub(size, 1) : huge(start) ? ((start as number) > 0 ? sub(size, 1) : -1) : clamp(wrap(start), -1, sub(size, 1))
  e = stop === undefined ? -1 : huge(stop) ? ((stop as number) > 0 ? sub(size, 1) : -1) : clamp(wrap(stop), -1, sub(size, 1))
  const len = sub(s, e)
  const count = signOf(len) === "neg" || signOf(len) === "nonpos" ? 0 : ceilDiv(len, -step)
  return { start: s, count: typeof count === "number" ? Math.max(0, count) : count }
}

// ---------------------------------------------------------------------------
// Contents (small tensors)
// ---------------------------------------------------------------------------

const stridesOf = (shape: ReadonlyArray<number>): Array<number> => {
  const s = new Array<number>(shape.length)
  let acc = 1
  for (let i = shape.length - 1; i >= 0; i--) {
    s[i] = acc
    acc *= shape[i]
  }
  return s
}

/** Elementwise contents over broadcast operands, when all are known and the output is small. */
const elementwise = (
  out: ReadonlyArray<Dim>,
  args: ReadonlyArray<Fake>,
  f: (xs: ReadonlyArray<Dim>) => Dim | undefined
): ReadonlyArray<Dim | undefined> | undefined => {
  const oc = concrete(out)
  if (oc === undefined || args.some((a) => a.value === undefined)) return undefined
  const size = oc.reduce((a, b) => a * b, 1)
  if (size > maxValueSize) return undefined
  const rank = oc.length
  const views = args.map((a) => {
    const s = [...new Array<number>(rank - a.shape.length).fill(1), ...(a.shape as ReadonlyArray<number>)]
    const st = stridesOf(s).map((x, i) => (s[i] === 1 ? 0 : x))
    return { st, v: a.value! }
  })
  const res: Array<Dim | undefined> = []
  const idx = new Array<number>(rank).fill(0)
  for (let n = 0; n < size; n++) {
    res.push(f(views.map(({ st, v }) => v[idx.reduce((acc, c, i) => acc + c * st[i], 0)])))
    for (let i = rank - 1; i >= 0; i--) {
      if (++idx[i] < oc[i]) break
      idx[i] = 0
    }
  }
  return res
}

const isIntType = (d: DType.DType) => !DType.isFloat(d) && d !== "string" && d !== "bool"

/** A dim converted as a `Cast` to `to` converts it. */
const castDim = (d: Dim, to: DType.DType): Dim | undefined => {
  if (to === "bool") {
    const s = signOf(d)
    return s === "zero" ? 0 : s === "pos" || s === "neg" ? 1 : undefined
  }
  if (typeof d !== "number") return DType.isFloat(to) || isIntType(to) ? d : undefined
  if (to === "float32") return Math.fround(d)
  if (DType.isFloat(to)) return d
  return Math.trunc(d)
}

const numeric = (f: (...xs: Array<number>) => number) => (xs: ReadonlyArray<Dim>): Dim | undefined =>
  xs.every((x): x is number => typeof x === "number") ? f(...xs) : undefined

const roundTo = (dtype: DType.DType, d: Dim | undefined): Dim | undefined =>
  d === undefined ? undefined : typeof d === "number" ? (dtype === "float32" ? Math.fround(d) : isIntType(dtype) ? Math.trunc(d) : d) : d

const toBool = (b: boolean | undefined): Dim | undefined => (b === undefined ? undefined : b ? 1 : 0)

/** Gathers contents along an axis (indices already normalized). */
const gatherValues = (data: Fake, indices: Fake, axis: number, outShape: ReadonlyArray<Dim>): ReadonlyArray<Dim> | undefined => {
  const ds = concrete(data.shape)
  const oc = concrete(outShape)
  if (data.value === undefined || indices.value === undefined || ds === undefined || oc === undefined) return undefined
  const outer = ds.slice(0, axis).reduce((a, b) => a * b, 1)
  const inner = ds.slice(axis + 1).reduce((a, b) => a * b, 1)
  const res: Array<Dim> = []
  for (let o = 0; o < outer; o++) {
    for (const ix of indices.value) {
      if (typeof ix !== "number") return undefined
      const i = ix < 0 ? ix + ds[axis] : ix
      for (let r = 0; r < inner; r++) res.push(data.value[(o * ds[axis] + i) * inner + r])
    }
  }
  return res
}

/** Contents of a strided slice of a concrete-shaped, known tensor. */
const sliceValues = (
  data: Fake,
  ranges: ReadonlyArray<{ readonly start: number; readonly step: number; readonly count: number }>
): ReadonlyArray<Dim> | undefined => {
  const ds = concrete(data.shape)
  if (data.value === undefined || ds === undefined) return undefined
  const st = stridesOf(ds)
  let offsets = [0]
  ranges.forEach((r, dim) => {
    const next: Array<number> = []
    for (const o of offsets) for (let k = 0; k < r.count; k++) next.push(o + (r.start + k * r.step) * st[dim])
    offsets = next
  })
  return offsets.map((o) => data.value![o])
}

// ---------------------------------------------------------------------------
// ONNX operator rules
// ---------------------------------------------------------------------------

/**
 * What a rule sees: the node, the fakes of its inputs (`undefined` for an
 * omitted optional input), and every tensor known so far (for subgraphs).
 *
 * @since 0.1.0
 */
export interface Context {
  readonly node: Onnx.Node
  readonly inputs: ReadonlyArray<Fake | undefined>
  readonly env: ReadonlyMap<string, Fake>
}

/**
 * A shape rule: the fakes of a node's outputs (`undefined` for an output
 * it does not produce).
 *
 * @since 0.1.0
 */
export type Rule = (ctx: Context) => ReadonlyArray<Fake | undefined>

const dtypeOfCode = (code: number, opType: string): DType.DType => {
  const d = DType.fromOnnx(code)
  return d ?? fail(opType, `element type ${code} is not supported`)
}

const input = (ctx: Context, k: number): Fake => {
  const f = ctx.inputs[k]
  return f ?? fail(ctx.node.opType, `input ${k} is missing`)
}

const attrNum = (node: Onnx.Node, name: string, dflt: number): number => {
  const v = Onnx.attrInt(node, name)
  return v === undefined ? dflt : Number(v)
}

const attrNums = (node: Onnx.Node, name: string): ReadonlyArray<number> | undefined => {
  const a = Onnx.getAttribute(node, name)
  return a === undefined ? undefined : a.ints.map(Number)
}

/** The known contents of an input, as dims. */
const dimsOf = (ctx: Context, k: number, what: string): ReadonlyArray<Dim> => {
  const f = input(ctx, k)
  return f.value ?? fail(ctx.node.opType, `${what} (input ${k}) is computed from data, so its value is not known statically`)
}

/** The known contents of an input, as numbers. */
const numsOf = (ctx: Context, k: number, what: string): ReadonlyArray<number> => {
  const v = dimsOf(ctx, k, what)
  return v.map((d) => (typeof d === "number" ? d : fail(ctx.node.opType, `${what} (input ${k}) is symbolic (${formatDim(d)}); a number is needed`)))
}

/** Axes from input `k` when given, else from attribute `name`. */
const axesFrom = (ctx: Context, k: number, name = "axes"): ReadonlyArray<number> | undefined =>
  ctx.inputs[k] !== undefined ? numsOf(ctx, k, name) : attrNums(ctx.node, name)

const same: Rule = (ctx) => ctx.node.outputs.map(() => {
  const x = input(ctx, 0)
  return { dtype: x.dtype, shape: x.shape }
})

const unary =
  (f?: (d: Dim, dtype: DType.DType) => Dim | undefined, outType?: DType.DType): Rule =>
  (ctx) => {
    const x = input(ctx, 0)
    const dtype = outType ?? x.dtype
    const value = f && x.value ? x.value.map((d) => f(d, x.dtype)) : undefined
    return [fake(dtype, x.shape, value)]
  }

const binary =
  (f?: (a: Dim, b: Dim, dtype: DType.DType) => Dim | undefined, outType?: DType.DType): Rule =>
  (ctx) => {
    const a = input(ctx, 0)
    const b = input(ctx, 1)
    const shape = broadcast([a.shape, b.shape], ctx.node.opType)
    const dtype = outType ?? a.dtype
    const value = f ? elementwise(shape, [a, b], ([x, y]) => f(x, y, a.dtype)) : undefined
    return [fake(dtype, shape, value)]
  }

const variadic =
  (f?: (xs: ReadonlyArray<Dim>) => Dim | undefined): Rule =>
  (ctx) => {
    const xs = ctx.inputs.filter((x): x is Fake => x !== undefined)
    if (xs.length === 0) fail(ctx.node.opType, "no inputs")
    const shape = broadcast(xs.map((x) => x.shape), ctx.node.opType)
    return [fake(xs[0].dtype, shape, f ? elementwise(shape, xs, f) : undefined)]
  }

const divDim = (a: Dim, b: Dim, dtype: DType.DType): Dim | undefined => {
  if (typeof a === "number" && typeof b === "number") {
    if (b === 0) return undefined
    return isIntType(dtype) ? Math.trunc(a / b) : roundTo(dtype, a / b)
  }
  const q = divExact(a, b)
  if (q !== undefined) return q
  return isIntType(dtype) ? floorDiv(a, b) : undefined
}

const compareRule = (test: (a: Dim, b: Dim) => boolean | undefined): Rule => binary((a, b) => toBool(test(a, b)), "bool")

const reduceRule =
  (axesAsInput: "always" | "never"): Rule =>
  (ctx) => {
    const x = input(ctx, 0)
    const keepdims = attrNum(ctx.node, "keepdims", 1) !== 0
    const noop = attrNum(ctx.node, "noop_with_empty_axes", 0) !== 0
    const axes = axesAsInput === "always" && ctx.inputs[1] !== undefined ? numsOf(ctx, 1, "axes") : attrNums(ctx.node, "axes") ?? (ctx.inputs[1] !== undefined ? numsOf(ctx, 1, "axes") : undefined)
    if ((axes === undefined || axes.length === 0) && noop) return [{ dtype: x.dtype, shape: x.shape }]
    return [{ dtype: x.dtype, shape: reduce(x.shape, axes, keepdims, ctx.node.opType) }]
  }

const argRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const axis = normAxis(attrNum(ctx.node, "axis", 0), x.shape.length, ctx.node.opType)
  return [{ dtype: "int64", shape: reduce(x.shape, [axis], attrNum(ctx.node, "keepdims", 1) !== 0, ctx.node.opType) }]
}

const constantRule: Rule = (ctx) => {
  const node = ctx.node
  const t = Onnx.attrTensor(node, "value")
  if (t) return [fromTensorProto(t, node.opType)]
  const a = (name: string) => Onnx.getAttribute(node, name)
  const f = a("value_float")
  if (f?.f !== undefined) return [{ dtype: "float32", shape: [], value: [f.f] }]
  const fs = a("value_floats")
  if (fs) return [fake("float32", [fs.floats.length], fs.floats)]
  const i = a("value_int")
  if (i?.i !== undefined) return [{ dtype: "int64", shape: [], value: [Number(i.i)] }]
  const is = a("value_ints")
  if (is) return [fake("int64", [is.ints.length], is.ints.map(Number))]
  if (a("value_string")) return [{ dtype: "string", shape: [] }]
  const ss = a("value_strings")
  if (ss) return [{ dtype: "string", shape: [ss.strings.length] }]
  return fail(node.opType, "a Constant without a value")
}

/**
 * The fake of an initializer or constant tensor: its dims and type, and its
 * data when small (never reading a big tensor's data).
 *
 * @since 0.1.0
 */
export const fromTensorProto = (t: Onnx.TensorProto, opType = "initializer"): Fake => {
  const dtype = dtypeOfCode(t.dataType, opType)
  const shape = t.dims.map(Number)
  const size = shape.reduce((a, b) => a * b, 1)
  if (size > maxValueSize || dtype === "string" || t.dataLocation === "EXTERNAL") return { dtype, shape }
  const value = smallData(t, dtype, size)
  return value === undefined ? { dtype, shape } : fake(dtype, shape, value)
}

/** The elements of a small tensor as numbers (read straight from its bytes; no copy of the tensor). */
const smallData = (t: Onnx.TensorProto, dtype: DType.DType, size: number): Array<Dim> | undefined => {
  const raw = t.rawData
  if (raw !== undefined) {
    const width = DType.byteSize(dtype)
    if (raw.byteLength !== size * width) return undefined
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength)
    const out: Array<Dim> = new Array(size)
    for (let k = 0; k < size; k++) {
      const o = k * width
      switch (dtype) {
        case "float32": out[k] = view.getFloat32(o, true); break
        case "float64": out[k] = view.getFloat64(o, true); break
        case "int64": out[k] = Number(view.getBigInt64(o, true)); break
        case "uint64": out[k] = Number(view.getBigUint64(o, true)); break
        case "int32": out[k] = view.getInt32(o, true); break
        case "uint32": out[k] = view.getUint32(o, true); break
        case "int16": out[k] = view.getInt16(o, true); break
        case "uint16": out[k] = view.getUint16(o, true); break
        case "int8": out[k] = view.getInt8(o); break
        case "uint8": out[k] = view.getUint8(o); break
        case "bool": out[k] = view.getUint8(o) !== 0 ? 1 : 0; break
        default: return undefined // float16: not needed for shapes
      }
    }
    return out
  }
  try {
    const data = Onnx.tensorData(t) as ArrayLike<number | bigint>
    const out: Array<Dim> = []
    for (let k = 0; k < data.length; k++) out.push(Number(data[k]))
    return out
  } catch {
    return undefined
  }
}

const castRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const to = dtypeOfCode(attrNum(ctx.node, "to", 0), ctx.node.opType)
  return [fake(to, x.shape, x.value?.map((d) => castDim(d, to)))]
}

const shapeRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const rank = x.shape.length
  const clampAxis = (a: number) => Math.min(Math.max(a < 0 ? a + rank : a, 0), rank)
  const start = clampAxis(attrNum(ctx.node, "start", 0))
  const end = clampAxis(attrNum(ctx.node, "end", rank))
  const dims = x.shape.slice(start, Math.max(start, end))
  return [{ dtype: "int64", shape: [dims.length], value: dims }]
}

const sizeRule: Rule = (ctx) => [{ dtype: "int64", shape: [], value: [product(input(ctx, 0).shape)] }]

const reshapeRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const target = dimsOf(ctx, 1, "the target shape")
  const shape = reshape(x.shape, target, { zeroCopies: attrNum(ctx.node, "allowzero", 0) === 0, opType: ctx.node.opType })
  return [fake(x.dtype, shape, x.value)]
}

const flattenRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const rank = x.shape.length
  const axis = attrNum(ctx.node, "axis", 1)
  const a = axis < 0 ? axis + rank : axis
  if (a < 0 || a > rank) fail(ctx.node.opType, `axis ${axis} is out of range for rank ${rank}`)
  return [fake(x.dtype, [product(x.shape.slice(0, a)), product(x.shape.slice(a))], x.value)]
}

const transposeRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const perm = attrNums(ctx.node, "perm")
  const shape = transpose(x.shape, perm, ctx.node.opType)
  let value: ReadonlyArray<Dim> | undefined
  const xs = concrete(x.shape)
  if (x.value !== undefined && xs !== undefined) {
    const p = perm ?? xs.map((_, i) => xs.length - 1 - i)
    const st = stridesOf(xs)
    const oc = shape as ReadonlyArray<number>
    const res: Array<Dim> = []
    const idx = new Array<number>(oc.length).fill(0)
    for (let n = 0; n < x.value.length; n++) {
      res.push(x.value[idx.reduce((acc, c, i) => acc + c * st[p[i] < 0 ? p[i] + xs.length : p[i]], 0)])
      for (let i = oc.length - 1; i >= 0; i--) {
        if (++idx[i] < oc[i]) break
        idx[i] = 0
      }
    }
    value = res
  }
  return [fake(x.dtype, shape, value)]
}

const gatherRule: Rule = (ctx) => {
  const data = input(ctx, 0)
  const indices = input(ctx, 1)
  const axis = normAxis(attrNum(ctx.node, "axis", 0), data.shape.length, ctx.node.opType)
  const size = data.shape[axis]
  if (indices.value !== undefined && typeof size === "number") {
    for (const i of indices.value) {
      if (typeof i === "number" && (i < -size || i >= size)) fail(ctx.node.opType, `index ${i} is out of bounds for axis ${axis} with size ${size}`)
    }
  }
  const shape = [...data.shape.slice(0, axis), ...indices.shape, ...data.shape.slice(axis + 1)]
  return [fake(data.dtype, shape, gatherValues(data, indices, axis, shape))]
}

const gatherElementsRule: Rule = (ctx) => {
  const data = input(ctx, 0)
  const indices = input(ctx, 1)
  normAxis(attrNum(ctx.node, "axis", 0), data.shape.length, ctx.node.opType)
  return [{ dtype: data.dtype, shape: indices.shape }]
}

const gatherNDRule: Rule = (ctx) => {
  const data = input(ctx, 0)
  const indices = input(ctx, 1)
  const b = attrNum(ctx.node, "batch_dims", 0)
  const last = indices.shape[indices.shape.length - 1]
  if (typeof last !== "number") return fail(ctx.node.opType, "the last dimension of the indices must be known")
  return [{ dtype: data.dtype, shape: [...indices.shape.slice(0, -1), ...data.shape.slice(b + last)] }]
}

const sliceRule: Rule = (ctx) => {
  const data = input(ctx, 0)
  const rank = data.shape.length
  const fromInputs = ctx.inputs.length > 1
  const starts = fromInputs ? dimsOf(ctx, 1, "starts") : attrNums(ctx.node, "starts") ?? []
  const ends = fromInputs ? dimsOf(ctx, 2, "ends") : attrNums(ctx.node, "ends") ?? []
  const axes = (fromInputs ? (ctx.inputs[3] ? numsOf(ctx, 3, "axes") : undefined) : attrNums(ctx.node, "axes")) ?? starts.map((_, i) => i)
  const steps = (fromInputs && ctx.inputs[4] ? numsOf(ctx, 4, "steps") : undefined) ?? starts.map(() => 1)
  const shape = [...data.shape]
  const ranges = data.shape.map((d) => ({ start: 0 as Dim, step: 1, count: d }))
  axes.forEach((ax, k) => {
    const a = normAxis(ax, rank, ctx.node.opType)
    if (steps[k] === 0) fail(ctx.node.opType, "slice step cannot be zero")
    const r = sliceLength(data.shape[a], starts[k], ends[k], steps[k])
    shape[a] = r.count
    ranges[a] = { start: r.start, step: steps[k], count: r.count }
  })
  let value: ReadonlyArray<Dim> | undefined
  if (data.value !== undefined && ranges.every((r) => typeof r.start === "number" && typeof r.count === "number")) {
    value = sliceValues(data, ranges as ReadonlyArray<{ start: number; step: number; count: number }>)
  }
  return [fake(data.dtype, shape, value)]
}

const concatRule: Rule = (ctx) => {
  const xs = ctx.inputs.filter((x): x is Fake => x !== undefined)
  const axis = attrNum(ctx.node, "axis", 0)
  const shape = concat(xs.map((x) => x.shape), axis, ctx.node.opType)
  let value: Array<Dim> | undefined
  if (xs.every((x) => x.value !== undefined && concrete(x.shape) !== undefined)) {
    const a = normAxis(axis, shape.length, ctx.node.opType)
    const outer = (shape.slice(0, a) as ReadonlyArray<number>).reduce((p, q) => p * q, 1)
    value = []
    for (let o = 0; o < outer; o++) {
      for (const x of xs) {
        const chunk = (x.shape.slice(a) as ReadonlyArray<number>).reduce((p, q) => p * q, 1)
        value.push(...x.value!.slice(o * chunk, (o + 1) * chunk))
      }
    }
  }
  return [fake(xs[0].dtype, shape, value)]
}

const splitRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const n = ctx.node.outputs.length
  const axis = normAxis(attrNum(ctx.node, "axis", 0), x.shape.length, ctx.node.opType)
  const size = x.shape[axis]
  let parts: ReadonlyArray<Dim>
  const given = ctx.inputs[1] !== undefined ? dimsOf(ctx, 1, "split") : attrNums(ctx.node, "split")
  if (given !== undefined && given.length > 0) {
    parts = given
    if (parts.length !== n) fail(ctx.node.opType, `${parts.length} split sizes for ${n} outputs`)
    const total = parts.reduce<Dim>((acc, d) => add(acc, d), 0)
    if (typeof total === "number" && typeof size === "number" && total !== size) {
      fail(ctx.node.opType, `split sizes [${parts.map(formatDim)}] do not add up to ${size}`)
    }
  } else {
    const count = attrNum(ctx.node, "num_outputs", n)
    const chunk = ceilDiv(size, count)
    const exact = divExact(size, count)
    parts = Array.from({ length: n }, (_, k) =>
      exact !== undefined ? exact : k < n - 1 ? chunk : sub(size, mul(chunk, n - 1))
    )
  }
  let offset: Dim = 0
  return parts.map((p) => {
    const shape = [...x.shape]
    shape[axis] = p
    let value: ReadonlyArray<Dim> | undefined
    if (x.value !== undefined && typeof offset === "number" && typeof p === "number" && concrete(x.shape)) {
      value = sliceValues(x, x.shape.map((d, i) => (i === axis ? { start: offset as number, step: 1, count: p } : { start: 0, step: 1, count: d as number })))
    }
    offset = add(offset, p)
    return fake(x.dtype, shape, value)
  })
}

const squeezeRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  return [fake(x.dtype, squeeze(x.shape, axesFrom(ctx, 1), ctx.node.opType), x.value)]
}

const unsqueezeRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const axes = axesFrom(ctx, 1) ?? fail(ctx.node.opType, "no axes")
  return [fake(x.dtype, unsqueeze(x.shape, axes, ctx.node.opType), x.value)]
}

const expandRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const target = dimsOf(ctx, 1, "the target shape")
  const shape = broadcast([x.shape, target], ctx.node.opType)
  return [fake(x.dtype, shape, elementwise(shape, [x], ([v]) => v))]
}

const tileRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const reps = dimsOf(ctx, 1, "repeats")
  if (reps.length !== x.shape.length) fail(ctx.node.opType, `${reps.length} repeats for rank ${x.shape.length}`)
  return [{ dtype: x.dtype, shape: x.shape.map((d, i) => mul(d, reps[i])) }]
}

const whereRule: Rule = (ctx) => {
  const c = input(ctx, 0)
  const a = input(ctx, 1)
  const b = input(ctx, 2)
  const shape = broadcast([c.shape, a.shape, b.shape], ctx.node.opType)
  const value = elementwise(shape, [c, a, b], ([p, x, y]) => (p === 0 ? y : typeof p === "number" ? x : undefined))
  return [fake(a.dtype, shape, value)]
}

const constantOfShapeRule: Rule = (ctx) => {
  const shape = dimsOf(ctx, 0, "the shape")
  const t = Onnx.attrTensor(ctx.node, "value")
  const filler = t ? fromTensorProto(t, ctx.node.opType) : { dtype: "float32" as DType.DType, shape: [1], value: [0] }
  const size = concrete(shape)?.reduce((a, b) => a * b, 1)
  const v = filler.value?.[0]
  const value = size !== undefined && size <= maxValueSize && v !== undefined ? new Array<Dim>(size).fill(v) : undefined
  return [fake(filler.dtype, shape, value)]
}

const rangeRule: Rule = (ctx) => {
  const start = input(ctx, 0)
  const [s] = dimsOf(ctx, 0, "start")
  const [l] = dimsOf(ctx, 1, "limit")
  const [d] = dimsOf(ctx, 2, "delta")
  if (typeof d !== "number" || d === 0) return fail(ctx.node.opType, "delta must be a known non-zero number")
  const span = sub(l, s)
  let n: Dim = typeof span === "number" ? Math.max(Math.ceil(span / d), 0) : d > 0 ? ceilDiv(span, d) : ceilDiv(neg(span), -d)
  if (typeof n === "number") n = Math.max(n, 0)
  const value = typeof n === "number" && n <= maxValueSize ? Array.from({ length: n }, (_, k) => roundTo(start.dtype, add(s, k * d))) : undefined
  return [fake(start.dtype, [n], value)]
}

const matmulRule: Rule = (ctx) => {
  const a = input(ctx, 0)
  const b = input(ctx, 1)
  return [{ dtype: a.dtype, shape: matmul(a.shape, b.shape, ctx.node.opType) }]
}

const gemmRule: Rule = (ctx) => {
  const a = input(ctx, 0)
  const b = input(ctx, 1)
  if (a.shape.length !== 2 || b.shape.length !== 2) fail(ctx.node.opType, `Gemm needs matrices, got ${showShape(a.shape)} and ${showShape(b.shape)}`)
  const [m, k1] = attrNum(ctx.node, "transA", 0) ? [a.shape[1], a.shape[0]] : [a.shape[0], a.shape[1]]
  const [k2, n] = attrNum(ctx.node, "transB", 0) ? [b.shape[1], b.shape[0]] : [b.shape[0], b.shape[1]]
  if (typeof k1 === "number" && typeof k2 === "number" && k1 !== k2) {
    fail(ctx.node.opType, `inner dimensions do not match: ${showShape(a.shape)} and ${showShape(b.shape)}`)
  }
  return [{ dtype: a.dtype, shape: [m, n] }]
}

const layerNormRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const rank = x.shape.length
  const axis = normAxis(attrNum(ctx.node, "axis", -1), rank, ctx.node.opType)
  const stats = x.shape.map((d, i) => (i < axis ? d : 1))
  const statType = dtypeOfCode(attrNum(ctx.node, "stash_type", 1), ctx.node.opType)
  return ctx.node.outputs.map((_, k) => (k === 0 ? { dtype: x.dtype, shape: x.shape } : { dtype: statType, shape: stats }))
}

const softmaxRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  normAxis(attrNum(ctx.node, "axis", -1), x.shape.length, ctx.node.opType)
  return [{ dtype: x.dtype, shape: x.shape }]
}

const triluRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  if (x.shape.length < 2) fail(ctx.node.opType, `Trilu needs rank >= 2, got ${showShape(x.shape)}`)
  return [{ dtype: x.dtype, shape: x.shape }]
}

const ifRule: Rule = (ctx) => {
  const cond = input(ctx, 0)
  const c = cond.value?.[0]
  const branch = c === 0 ? "else_branch" : "then_branch"
  const g = Onnx.attrGraph(ctx.node, branch) ?? fail(ctx.node.opType, `no ${branch}`)
  const inner = inferGraph(g, new Map(), ctx.env)
  return g.outputs.map((o) => inner.get(o.name))
}

const dropoutRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  return ctx.node.outputs.map((_, k) => (k === 0 ? fake(x.dtype, x.shape, x.value) : { dtype: "bool", shape: x.shape }))
}

const topkRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const axis = normAxis(attrNum(ctx.node, "axis", -1), x.shape.length, ctx.node.opType)
  const k = ctx.inputs[1] !== undefined ? dimsOf(ctx, 1, "k")[0] : attrNum(ctx.node, "k", 1)
  const size = x.shape[axis]
  if (typeof k === "number" && typeof size === "number" && k > size) fail(ctx.node.opType, `k = ${k} is larger than the axis size ${size}`)
  const shape = x.shape.map((d, i) => (i === axis ? k : d))
  return [{ dtype: x.dtype, shape }, { dtype: "int64", shape }]
}

const padRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const rank = x.shape.length
  const pads = ctx.inputs[1] !== undefined ? dimsOf(ctx, 1, "pads") : attrNums(ctx.node, "pads") ?? fail(ctx.node.opType, "no pads")
  const axes = ctx.inputs[3] !== undefined ? numsOf(ctx, 3, "axes").map((a) => normAxis(a, rank, ctx.node.opType)) : x.shape.map((_, i) => i)
  const n = axes.length
  const shape = [...x.shape]
  axes.forEach((a, k) => (shape[a] = add(add(shape[a], pads[k]), pads[k + n])))
  return [{ dtype: x.dtype, shape }]
}

const oneHotRule: Rule = (ctx) => {
  const indices = input(ctx, 0)
  const [depth] = dimsOf(ctx, 1, "depth")
  const values = input(ctx, 2)
  const rank = indices.shape.length + 1
  const axis = normAxis(attrNum(ctx.node, "axis", -1), rank, ctx.node.opType)
  const shape = [...indices.shape]
  shape.splice(axis, 0, typeof depth === "number" ? Math.trunc(depth) : depth)
  return [{ dtype: values.dtype, shape }]
}

const nonZeroRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  if (x.value !== undefined && x.value.every((d) => typeof d === "number")) {
    return [{ dtype: "int64", shape: [x.shape.length, x.value.filter((d) => d !== 0).length] }]
  }
  return [{ dtype: "int64", shape: [x.shape.length, symbol(`nonzero(${ctx.node.name || ctx.node.outputs[0]})`)] }]
}

const convRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const w = input(ctx, 1)
  const spatial = x.shape.length - 2
  const kernel = attrNums(ctx.node, "kernel_shape") ?? w.shape.slice(2)
  const strides = attrNums(ctx.node, "strides") ?? new Array<number>(spatial).fill(1)
  const dil = attrNums(ctx.node, "dilations") ?? new Array<number>(spatial).fill(1)
  const pads = attrNums(ctx.node, "pads") ?? new Array<number>(2 * spatial).fill(0)
  const autoPad = Onnx.attrString(ctx.node, "auto_pad") ?? "NOTSET"
  const out: Array<Dim> = [x.shape[0], w.shape[0]]
  for (let i = 0; i < spatial; i++) {
    const inn = x.shape[i + 2]
    const eff = add(mul(dil[i], sub(kernel[i], 1)), 1)
    if (autoPad === "SAME_UPPER" || autoPad === "SAME_LOWER") out.push(ceilDiv(inn, strides[i]))
    else if (autoPad === "VALID") out.push(add(floorDiv(sub(inn, eff), strides[i]), 1))
    else out.push(add(floorDiv(sub(add(inn, pads[i] + pads[i + spatial]), eff), strides[i]), 1))
  }
  return [{ dtype: x.dtype, shape: out }]
}

const batchNormRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  const scale = input(ctx, 1)
  return ctx.node.outputs.map((_, k) => (k === 0 ? { dtype: x.dtype, shape: x.shape } : { dtype: scale.dtype, shape: scale.shape }))
}

const einsumRule: Rule = (ctx) => {
  const xs = ctx.inputs.filter((x): x is Fake => x !== undefined)
  const eq = (Onnx.attrString(ctx.node, "equation") ?? "").replace(/\s+/g, "")
  const [lhs, rhs] = eq.includes("->") ? eq.split("->") : [eq, undefined]
  const terms = lhs.split(",")
  if (terms.length !== xs.length) fail(ctx.node.opType, `equation "${eq}" has ${terms.length} operands, the node ${xs.length}`)
  const sizes = new Map<string, Dim>()
  const counts = new Map<string, number>()
  let ellipsis: ReadonlyArray<Dim> = []
  terms.forEach((t, k) => {
    const shape = xs[k].shape
    const parts = t.split("...")
    const before = parts[0].split("")
    const after = parts.length > 1 ? parts[1].split("") : []
    const nEll = shape.length - before.length - after.length
    if (parts.length === 1 && nEll !== 0) fail(ctx.node.opType, `operand ${k} of rank ${shape.length} does not fit "${t}"`)
    if (parts.length > 1) ellipsis = broadcast([ellipsis, shape.slice(before.length, before.length + nEll)], ctx.node.opType)
    const letters = [...before.map((c, i) => [c, shape[i]] as const), ...after.map((c, i) => [c, shape[before.length + nEll + i]] as const)]
    for (const [c, d] of letters) {
      counts.set(c, (counts.get(c) ?? 0) + 1)
      const old = sizes.get(c)
      sizes.set(c, old === undefined || old === 1 ? d : old)
    }
  })
  const outLetters =
    rhs !== undefined ? rhs : "..." + [...counts.entries()].filter(([, n]) => n === 1).map(([c]) => c).sort().join("")
  const [ob, oa] = outLetters.includes("...") ? outLetters.split("...") : [outLetters, undefined]
  const shape: Array<Dim> = [...ob.split("").filter(Boolean).map((c) => sizes.get(c) ?? fail(ctx.node.opType, `unknown letter ${c}`))]
  if (oa !== undefined) shape.push(...ellipsis, ...oa.split("").filter(Boolean).map((c) => sizes.get(c) ?? fail(ctx.node.opType, `unknown letter ${c}`)))
  return [{ dtype: xs[0].dtype, shape }]
}

const resizeRule: Rule = (ctx) => {
  const x = input(ctx, 0)
  if (ctx.inputs[3] !== undefined) {
    const sizes = dimsOf(ctx, 3, "sizes")
    const axes = attrNums(ctx.node, "axes")
    if (axes === undefined) return [{ dtype: x.dtype, shape: sizes }]
    const shape = [...x.shape]
    axes.forEach((a, k) => (shape[normAxis(a, x.shape.length, ctx.node.opType)] = sizes[k]))
    return [{ dtype: x.dtype, shape }]
  }
  const k = ctx.inputs[2] !== undefined ? 2 : 1
  const scales = numsOf(ctx, k, "scales")
  const axes = attrNums(ctx.node, "axes") ?? x.shape.map((_, i) => i)
  const shape = [...x.shape]
  axes.forEach((a, j) => {
    const i = normAxis(a, x.shape.length, ctx.node.opType)
    const d = x.shape[i]
    shape[i] = scales[j] === 1 ? d : typeof d === "number" ? Math.floor(d * scales[j]) : fail(ctx.node.opType, "scaling a symbolic dimension")
  })
  return [{ dtype: x.dtype, shape }]
}

const likeRule =
  (k: number): Rule =>
  (ctx) => {
    const x = input(ctx, 0)
    const code = Onnx.attrInt(ctx.node, "dtype")
    const dtype = code !== undefined ? dtypeOfCode(Number(code), ctx.node.opType) : k === 0 ? x.dtype : input(ctx, k).dtype
    return [{ dtype, shape: x.shape }]
  }

const randomRule: Rule = (ctx) => {
  const dtype = dtypeOfCode(attrNum(ctx.node, "dtype", DType.OnnxCode.FLOAT), ctx.node.opType)
  return [{ dtype, shape: attrNums(ctx.node, "shape") ?? [] }]
}

const prelu: Rule = (ctx) => {
  const x = input(ctx, 0)
  return [{ dtype: x.dtype, shape: broadcast([x.shape, input(ctx, 1).shape], ctx.node.opType) }]
}

const num = (f: (x: number) => number) => (d: Dim, dtype: DType.DType) => (typeof d === "number" ? roundTo(dtype, f(d)) : undefined)

/**
 * The ONNX operators (default domain) with a shape rule.
 *
 * @since 0.1.0
 */
export const opNames = [
  "Abs", "Acos", "Add", "And", "ArgMax", "ArgMin", "Asin", "Atan", "BatchNormalization", "Cast", "CastLike", "Ceil",
  "Celu", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "Cosh", "CumSum", "DequantizeLinear", "Div",
  "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "Gather",
  "GatherElements", "GatherND", "Gelu", "Gemm", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish", "Identity",
  "If", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log",
  "LogSoftmax", "MatMul", "Max", "Mean", "Min", "Mod", "Mul", "Neg", "NonZero", "Not", "OneHot", "Or", "Pad", "Pow",
  "PRelu", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
  "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "Round", "ScatterElements", "ScatterND",
  "Selu", "Shape", "Sigmoid", "Sign", "SimplifiedLayerNormalization", "Sin", "Sinh", "Size", "Slice", "Softmax",
  "Softplus", "Softsign", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "Tile", "TopK", "Transpose", "Trilu",
  "Unsqueeze", "Where", "Xor", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"
] as const

/**
 * An ONNX operator name with a shape rule.
 *
 * @since 0.1.0
 */
export type OnnxOpName = (typeof opNames)[number]

const bool = (f: (a: number, b: number) => boolean) => (a: Dim, b: Dim) =>
  typeof a === "number" && typeof b === "number" ? (f(a, b) ? 1 : 0) : undefined

/**
 * The shape rules, one per operator.
 *
 * @since 0.1.0
 */
export const rules = {
  Abs: unary((d) => (typeof d === "number" ? Math.abs(d) : signOf(d) === "pos" || signOf(d) === "nonneg" || signOf(d) === "zero" ? d : undefined)),
  Acos: unary(),
  Add: binary((a, b, t) => roundTo(t, add(a, b))),
  And: binary(bool((a, b) => a !== 0 && b !== 0), "bool"),
  ArgMax: argRule,
  ArgMin: argRule,
  Asin: unary(),
  Atan: unary(),
  BatchNormalization: batchNormRule,
  Cast: castRule,
  CastLike: (ctx) => {
    const x = input(ctx, 0)
    const to = input(ctx, 1).dtype
    return [fake(to, x.shape, x.value?.map((d) => castDim(d, to)))]
  },
  Ceil: unary(num(Math.ceil)),
  Celu: unary(),
  Clip: unary(),
  Concat: concatRule,
  Constant: constantRule,
  ConstantOfShape: constantOfShapeRule,
  Conv: convRule,
  Cos: unary(),
  Cosh: unary(),
  CumSum: unary(),
  DequantizeLinear: (ctx) => [{ dtype: ctx.inputs[1]?.dtype ?? "float32", shape: input(ctx, 0).shape }],
  Div: binary(divDim),
  Dropout: dropoutRule,
  Einsum: einsumRule,
  Elu: unary(),
  Equal: compareRule(decideEqual),
  Erf: unary(),
  Exp: unary(),
  Expand: expandRule,
  EyeLike: likeRule(0),
  Flatten: flattenRule,
  Floor: unary(num(Math.floor)),
  Gather: gatherRule,
  GatherElements: gatherElementsRule,
  GatherND: gatherNDRule,
  Gelu: unary(),
  Gemm: gemmRule,
  Greater: compareRule((a, b) => lessThan(b, a)),
  GreaterOrEqual: compareRule((a, b) => {
    const lt = lessThan(a, b)
    return lt === undefined ? undefined : !lt
  }),
  HardSigmoid: unary(),
  HardSwish: unary(),
  Identity: unary((d) => d),
  If: ifRule,
  InstanceNormalization: same,
  IsInf: unary(undefined, "bool"),
  IsNaN: unary(undefined, "bool"),
  LayerNormalization: layerNormRule,
  LeakyRelu: unary(),
  Less: compareRule(lessThan),
  LessOrEqual: compareRule((a, b) => {
    const lt = lessThan(b, a)
    return lt === undefined ? undefined : !lt
  }),
  Log: unary(),
  LogSoftmax: softmaxRule,
  MatMul: matmulRule,
  Max: variadic((xs) => xs.reduce<Dim | undefined>((a, b) => (a === undefined ? undefined : max(a, b)), xs[0])),
  Mean: variadic(),
  Min: variadic((xs) => xs.reduce<Dim | undefined>((a, b) => (a === undefined ? undefined : min(a, b)), xs[0])),
  Mod: binary((a, b, t) =>
    typeof a === "number" && typeof b === "number" && b !== 0 ? (isIntType(t) ? a - Math.floor(a / b) * b : a % b) : undefined
  ),
  Mul: binary((a, b, t) => roundTo(t, mul(a, b))),
  Neg: unary((d) => neg(d)),
  NonZero: nonZeroRule,
  Not: unary((d) => (typeof d === "number" ? (d === 0 ? 1 : 0) : undefined), "bool"),
  OneHot: oneHotRule,
  Or: binary(bool((a, b) => a !== 0 || b !== 0), "bool"),
  Pad: padRule,
  Pow: binary((a, b, t) => (typeof a === "number" && typeof b === "number" ? roundTo(t, a ** b) : undefined)),
  PRelu: prelu,
  Range: rangeRule,
  Reciprocal: unary(num((x) => 1 / x)),
  ReduceL1: reduceRule("never"),
  ReduceL2: reduceRule("never"),
  ReduceLogSumExp: reduceRule("never"),
  ReduceMax: reduceRule("never"),
  ReduceMean: reduceRule("never"),
  ReduceMin: reduceRule("never"),
  ReduceProd: reduceRule("never"),
  ReduceSum: reduceRule("always"),
  ReduceSumSquare: reduceRule("never"),
  Relu: unary((d) => (typeof d === "number" ? Math.max(d, 0) : signOf(d) === "pos" || signOf(d) === "nonneg" ? d : undefined)),
  Reshape: reshapeRule,
  Resize: resizeRule,
  Round: unary(num((x) => {
    const r = Math.round(x)
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r
  })),
  ScatterElements: same,
  ScatterND: same,
  Selu: unary(),
  Shape: shapeRule,
  Sigmoid: unary(),
  Sign: unary(num(Math.sign)),
  SimplifiedLayerNormalization: layerNormRule,
  Sin: unary(),
  Sinh: unary(),
  Size: sizeRule,
  Slice: sliceRule,
  Softmax: softmaxRule,
  Softplus: unary(),
  Softsign: unary(),
  Split: splitRule,
  Sqrt: unary(num(Math.sqrt)),
  Squeeze: squeezeRule,
  Sub: binary((a, b, t) => roundTo(t, sub(a, b))),
  Sum: variadic((xs) => xs.reduce<Dim>((a, b) => add(a, b), 0)),
  Tan: unary(),
  Tanh: unary(),
  Tile: tileRule,
  TopK: topkRule,
  Transpose: transposeRule,
  Trilu: triluRule,
  Unsqueeze: unsqueezeRule,
  Where: whereRule,
  Xor: binary(bool((a, b) => (a !== 0) !== (b !== 0)), "bool"),
  RandomNormal: randomRule,
  RandomUniform: randomRule,
  RandomNormalLike: likeRule(0),
  RandomUniformLike: likeRule(0)
} as const satisfies Record<OnnxOpName, Rule>

// `rules` must have exactly the operators of `opNames` (no extra keys).
type _Exact = Exclude<keyof typeof rules, OnnxOpName> extends never ? true : never
const _exact: _Exact = true
void _exact

const ruleOf = (op: string): Rule | undefined =>
  Object.prototype.hasOwnProperty.call(rules, op) ? (rules as Record<string, Rule>)[op] : undefined

/**
 * Whether an ONNX operator (default domain) has a shape rule.
 *
 * @since 0.1.0
 */
export const isKnownOp = (op: string): op is OnnxOpName => ruleOf(op) !== undefined

// ---------------------------------------------------------------------------
// Inference over graphs
// ---------------------------------------------------------------------------

/**
 * Fakes by tensor name, as a Map or a record.
 *
 * @since 0.1.0
 */
export type Inputs = ReadonlyMap<string, Fake> | Readonly<Record<string, Fake>>

const entries = (inputs: Inputs): Iterable<readonly [string, Fake]> =>
  inputs instanceof Map ? inputs.entries() : Object.entries(inputs as Record<string, Fake>)

/**
 * The declared fake of a graph input: `dim_param`s become symbols of the
 * same name, `dim_value`s numbers, unknown dims the symbol `name.k`.
 *
 * @example
 * Shapes.declared(model.graph.inputs[0]) // { dtype: "int64", shape: [batch_size, sequence_length] }
 *
 * @since 0.1.0
 */
export const declared = (v: Onnx.ValueInfo): Fake | undefined => {
  const t = Onnx.tensorType(v)
  if (t === undefined || t.shape === undefined) return undefined
  const dtype = DType.fromOnnx(t.elemType)
  if (dtype === undefined) return undefined
  return {
    dtype,
    shape: t.shape.map((d, k) => (d._tag === "Value" ? d.value : d._tag === "Param" && d.param !== "" ? symbol(d.param) : symbol(`${v.name}.${k}`)))
  }
}

/**
 * Every graph input's declared fake (see {@link declared}), by name.
 *
 * @example
 * Shapes.declaredInputs(model).get("input_ids") // int64[batch_size, sequence_length]
 *
 * @since 0.1.0
 */
export const declaredInputs = (model: Onnx.Model): Map<string, Fake> => {
  const out = new Map<string, Fake>()
  for (const v of model.graph.inputs) {
    const f = declared(v)
    if (f !== undefined) out.set(v.name, f)
  }
  return out
}

/**
 * Runs the rules of `nodes`, in order, reading and writing `env`. A node
 * whose inputs are missing from `env` fails; so does an operator without
 * rule ({@link UnknownOperator}) and shapes that do not fit
 * ({@link ShapeError}, naming the node).
 *
 * @example
 * const env = Shapes.inferModel(model, inputs)
 * Shapes.inferNodes(nodes, env)  // recompute a node range after overriding its inputs in env
 *
 * @since 0.1.0
 */
export const inferNodes = (nodes: Iterable<Onnx.Node>, env: Map<string, Fake>): void => {
  for (const node of nodes) {
    if (node.domain !== "" && node.domain !== "ai.onnx") {
      throw new UnknownOperator({ opType: node.opType, domain: node.domain, node: node.name })
    }
    const rule = ruleOf(node.opType)
    if (rule === undefined) throw new UnknownOperator({ opType: node.opType, domain: node.domain, node: node.name })
    const inputs = node.inputs.map((name) => {
      if (name === "") return undefined
      const f = env.get(name)
      if (f === undefined) {
        throw new ShapeError({ opType: node.opType, node: node.name, reason: `input "${name}" is not known (not a graph input, initializer or earlier output)` })
      }
      return f
    })
    let outs: ReadonlyArray<Fake | undefined>
    try {
      outs = rule({ node, inputs, env })
    } catch (e) {
      if (e instanceof ShapeError && e.node === "") throw new ShapeError({ opType: e.opType, node: node.name, reason: e.reason })
      throw e
    }
    node.outputs.forEach((o, k) => {
      const f = outs[k]
      if (o !== "" && f !== undefined) env.set(o, f)
    })
  }
}

/**
 * Infers every tensor of a graph: its inputs (given ones, else declared
 * ones), initializers, then each node's outputs. `outer` holds the tensors
 * of enclosing graphs (If bodies read them by name).
 *
 * @since 0.1.0
 */
export const inferGraph = (graph: Onnx.Graph, inputs: Inputs, outer?: ReadonlyMap<string, Fake>): Map<string, Fake> => {
  const env = new Map<string, Fake>(outer ?? [])
  for (const t of graph.initializers) env.set(t.name, fromTensorProto(t))
  const given = new Map(entries(inputs))
  for (const v of graph.inputs) {
    const f = given.get(v.name) ?? (env.has(v.name) ? undefined : declared(v))
    if (f !== undefined) env.set(v.name, f)
  }
  for (const [name, f] of given) env.set(name, f)
  inferNodes(graph.nodes, env)
  return env
}

/**
 * Infers the fake of every tensor of a model from fakes of its inputs.
 * Inputs not given take their declared shapes (`dim_param`s as symbols);
 * symbolic inputs give symbolic shapes, concrete inputs concrete ones.
 * Initializers contribute their dims only (and the data of small ones); no
 * onnxruntime session is involved.
 *
 * @example
 * const seq = Shapes.symbol("sequence_length")
 * const fakes = Shapes.inferModel(model, { input_ids: { dtype: "int64", shape: [2, seq] } })
 * fakes.get("logits")?.shape // [2, sequence_length, 512]
 *
 * @since 0.1.0
 */
export const inferModel = (model: Onnx.Model, inputs: Inputs): Map<string, Fake> => inferGraph(model.graph, inputs)
