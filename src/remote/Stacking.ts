/**
 * Stacking: which co-batched jobs may share one invoke. Jobs that send the
 * same one-invoke graph (one experiment over many prompts, from one user or
 * many) can run as a single invoke over all their rows, so the graph's own
 * operations run once over the stacked rows instead of once per job, when
 * every operation keeps rows apart: each row of its result is computed from
 * the same row of its arguments alone, and the rows stay on the first axis.
 * This module decides that (an interpreter of the graph with one rule per
 * operation) and splits a stacked outcome back into each job's.
 *
 * @example
 * import * as Stacking from "./Stacking.js"
 * const rows = Stacking.rowwise(graph, scanned.values, scanned.hooks)
 * // rows === undefined: some operation mixes rows; run the jobs as separate invokes
 *
 * @since 0.1.0
 */
import type * as Errors from "../core/Errors.js"
import type * as Graph from "../core/Graph.js"
import * as Index from "../core/Index.js"
import type * as Ops from "../core/Ops.js"
import { Tensor } from "../core/Tensor.js"
import { decodeItems } from "../core/Tracer.js"
import * as Scan from "../backends/Scan.js"
import type * as Local from "../backends/Local.js"
import type * as Values from "../backends/Values.js"
import type * as Shapes from "../models/Shapes.js"

/**
 * One argument of an operation as the rules see it: whether it holds the
 * invoke's rows along its first axis, and its shape.
 *
 * @since 0.1.0
 */
export interface Arg {
  readonly rows: boolean
  readonly shape: ReadonlyArray<Shapes.Dim>
}

type Attrs = Readonly<Record<string, unknown>>

/**
 * Whether an operation keeps rows apart, for arguments of which at least
 * one holds rows: every output then holds the rows along its first axis,
 * each row computed from the same row of the arguments (and from the
 * arguments that hold no rows) alone.
 *
 * @since 0.1.0
 */
export type Rule = (args: ReadonlyArray<Arg>, attrs: Attrs) => boolean

const rank = (a: Arg): number => a.shape.length

const axisOf = (axis: unknown, r: number): number | undefined =>
  typeof axis !== "number" || !Number.isInteger(axis) ? undefined : axis < 0 ? axis + r : axis

/** A size-1 leading dimension, or fewer dimensions than `r`: broadcasts over any number of rows. */
const broadcastsOver = (a: Arg, r: number): boolean => rank(a) < r || a.shape[0] === 1

const unary: Rule = () => true

// NumPy broadcasting aligns trailing axes: the rows stay first when every argument
// with rows has the result's rank, and every other argument broadcasts over them
const elementwise: Rule = (args) => {
  const r = Math.max(...args.map(rank))
  return args.every((a) => (a.rows ? rank(a) === r : broadcastsOver(a, r)))
}

const alongAxis: Rule = (args, attrs) => {
  const a = axisOf(attrs.axis, rank(args[0]))
  return a !== undefined && a !== 0
}

const reduction: Rule = (args, attrs) => {
  const axes = attrs.axes
  // no axes (or none): every element, rows included
  if (!Array.isArray(axes) || axes.length === 0) return false
  return axes.every((x) => {
    const a = axisOf(x, rank(args[0]))
    return a !== undefined && a !== 0
  })
}

const product = (dims: ReadonlyArray<Shapes.Dim>): number | undefined =>
  dims.every((d): d is number => typeof d === "number") ? dims.reduce((p, d) => p * d, 1) : undefined

/** Whether index items keep the first axis whole and first. */
const keepsFirstAxis = (items: ReadonlyArray<Index.Item>, r: number): boolean => {
  const specs = Index.parse(items)
  if (specs.length === 0) return true
  const [first] = specs
  switch (first._tag) {
    case "Slice":
      return first.start === undefined && first.stop === undefined && first.step === 1
    case "Ellipsis":
      // the ellipsis covers the first axis when the other items consume fewer axes than there are
      return specs.filter((s) => s._tag === "Int" || s._tag === "Slice").length < r
    case "Int":
    case "NewAxis":
      return false
  }
}

const matMul: Rule = ([a, b]) => {
  const [ra, rb] = [rank(a), rank(b)]
  // the result's leading axes are the operands' stacking axes, broadcast and aligned at
  // the right; the rows stay first on the matrix rows of a 2-d left operand, or on a
  // stacking axis no other operand outranks or stretches
  if (a.rows && !b.rows) return ra >= 2 && rb <= ra && (rb < ra || ra === 2 || b.shape[0] === 1)
  if (b.rows && !a.rows) return rb >= 3 && ra <= rb && (ra < rb || a.shape[0] === 1)
  return ra === rb && ra >= 3
}

/**
 * The rule of every operation.
 *
 * @since 0.1.0
 */
export const rules = {
  Add: elementwise,
  Sub: elementwise,
  Mul: elementwise,
  Div: elementwise,
  Pow: elementwise,
  Mod: elementwise,
  Neg: unary,
  Abs: unary,
  Exp: unary,
  Log: unary,
  Sqrt: unary,
  Tanh: unary,
  Sigmoid: unary,
  Relu: unary,
  MatMul: matMul,
  Softmax: alongAxis,
  LogSoftmax: alongAxis,
  ArgMax: alongAxis,
  TopK: alongAxis,
  Select: unary,
  ReduceSum: reduction,
  ReduceMean: reduction,
  ReduceMax: reduction,
  ReduceL2: reduction,
  Identity: unary,
  // another argument cannot have the right number of rows
  Concat: (args, attrs) => args.every((a) => a.rows) && alongAxis(args, attrs),
  Equal: elementwise,
  Less: elementwise,
  LessOrEqual: elementwise,
  Greater: elementwise,
  GreaterOrEqual: elementwise,
  Not: unary,
  And: elementwise,
  Or: elementwise,
  Where: elementwise,
  Cast: unary,
  // only a leading -1 that stands for the rows (a written size would be one job's count)
  Reshape: ([x], attrs) => {
    const shape = attrs.shape as ReadonlyArray<number>
    const rest = product(x.shape.slice(1))
    return shape[0] === -1 && !shape.slice(1).includes(-1) && rest !== undefined && product(shape.slice(1)) === rest
  },
  Transpose: ([x], attrs) => {
    if (Array.isArray(attrs.perm)) return axisOf(attrs.perm[0], rank(x)) === 0
    if (Array.isArray(attrs.swap)) return attrs.swap.every((d) => axisOf(d, rank(x)) !== 0)
    return rank(x) === 1
  },
  Unsqueeze: ([x], attrs) =>
    Array.isArray(attrs.axes) && attrs.axes.every((d) => axisOf(d, rank(x) + (attrs.axes as Array<unknown>).length) !== 0),
  Squeeze: ([x], attrs) => Array.isArray(attrs.axes) && attrs.axes.every((d) => axisOf(d, rank(x)) !== 0),
  Index: ([x], attrs) => keepsFirstAxis(decodeItems(attrs.items), rank(x)),
  SetIndex: ([x, v], attrs) => {
    const items = decodeItems(attrs.items)
    if (!x.rows || !keepsFirstAxis(items, rank(x))) return false
    const region = Scan.indexShape(x.shape, items).length
    return v.rows ? rank(v) === region : broadcastsOver(v, region)
  },
  // its value is the shape, rows count included
  Shape: () => false,
  Expand: ([x], attrs) => {
    const shape = attrs.shape as ReadonlyArray<number>
    return shape.length < rank(x) || (shape.length === rank(x) && shape[0] === 1)
  }
} as const satisfies Record<Ops.OpName, Rule>

const fakeOf = (v: Scan.Value | Shapes.Fake | undefined): Shapes.Fake | undefined =>
  v === undefined ? undefined : Array.isArray(v) ? (v as ReadonlyArray<Shapes.Fake>)[0] : (v as Shapes.Fake)

/**
 * The ids of a one-invoke trace graph's values that hold its rows along
 * their first axis, when every node keeps rows apart; `undefined` when one
 * does not (or the graph holds nodes a stacked run cannot share). `values`
 * and `hooks` are a scan's (`Scan.run`) at the graph's inputs; every hook
 * must read or write a tensor whose first axis is the batch.
 *
 * @example
 * const { values, hooks } = Scan.run(loaded, { graph, inputs: feeds, rows })
 * Stacking.rowwise(graph, values, hooks) // Set { 0, 1, 3 } or undefined
 *
 * @since 0.1.0
 */
export const rowwise = (
  graph: Graph.Graph,
  values: ReadonlyMap<number, Scan.Value | Shapes.Fake>,
  hooks: ReadonlyMap<string, Shapes.Fake>
): ReadonlySet<number> | undefined => {
  if (graph.invokes !== 1) return undefined
  const rows = new Set<number>()
  const arg = (id: number): Arg | undefined => {
    const f = fakeOf(values.get(id))
    return f === undefined ? undefined : { rows: rows.has(id), shape: f.shape }
  }
  for (const n of graph.nodes) {
    switch (n._tag) {
      case "Hook":
        if (n.ref.invoke !== 0) return undefined
        rows.add(n.id)
        break
      case "Constant":
      case "Scalar":
      case "Param":
        break
      case "Op": {
        const args: Array<Arg> = []
        for (const a of n.args) {
          const x = arg(a)
          if (x === undefined) return undefined
          args.push(x)
        }
        if (!args.some((a) => a.rows)) break
        if (!(rules[n.op] as Rule)(args, n.attrs as Attrs)) return undefined
        rows.add(n.id)
        break
      }
      case "Set": {
        if (n.ref.invoke !== 0) return undefined
        const target = hooks.get(Scan.hookKey(n.ref))
        const v = arg(n.value)
        if (target === undefined || v === undefined) return undefined
        const r = target.shape.length
        if (v.rows ? rank(v) !== r : !broadcastsOver(v, r)) return undefined
        break
      }
      case "Apply":
      case "Stop":
      case "Generated":
      case "Value":
      case "ListNew":
      case "DictNew":
      case "Append":
      case "Assign":
      case "Call":
      case "Log":
      case "Grad":
      case "SetGrad":
      case "Backward":
      case "Cond":
      case "Iter":
      case "Trace":
        return undefined
      default: {
        const unknown: never = n
        return unknown
      }
    }
  }
  return rows
}

/**
 * The jobs of one stack: each job's rows in the stacked invoke, in order.
 *
 * @since 0.1.0
 */
export interface Member {
  readonly start: number
  readonly count: number
}

/**
 * The members of a stack, one after another.
 *
 * @example
 * Stacking.members([2, 1]) // [{ start: 0, count: 2 }, { start: 2, count: 1 }]
 *
 * @since 0.1.0
 */
export const members = (counts: ReadonlyArray<number>): ReadonlyArray<Member> => {
  let at = 0
  return counts.map((count) => {
    const m = { start: at, count }
    at += count
    return m
  })
}

const rowsOf = (v: Values.Val, m: Member): Values.Val =>
  v instanceof Tensor ? v.at({ start: m.start, stop: m.start + m.count })
  : Array.isArray(v) ? (v as ReadonlyArray<Tensor>).map((t) => t.at({ start: m.start, stop: m.start + m.count }))
  : v

/**
 * One member's outcome of a stacked run: its rows of the values that hold
 * rows, the others (computed from constants alone) whole.
 *
 * @example
 * const mine = Stacking.split(outcome, rows, member)
 *
 * @since 0.1.0
 */
export const split = (outcome: Local.Outcome, rows: ReadonlySet<number>, member: Member): Local.Outcome => {
  const values = new Map<number, Values.Val>()
  for (const [id, v] of outcome.values) values.set(id, rows.has(id) ? rowsOf(v, member) : v)
  return { values, unavailable: new Map<number, Errors.Unavailable>(outcome.unavailable) }
}
