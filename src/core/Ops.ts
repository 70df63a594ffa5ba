/**
 * The tensor operations an intervention graph can hold. Names follow the ONNX
 * operator vocabulary (one op set for execution, shape inference and
 * gradients); `Index`, `SetIndex` and `Select` are the few that are not ONNX
 * operators (Python-style indexing, slice assignment, picking one output of a
 * multi-output op). Each interpreter keeps its own table of rules keyed by
 * {@link OpName}, checked with `satisfies Record<OpName, Rule>`.
 *
 * Attributes are JSON: `Softmax {axis}`, `ArgMax {axis, keepdims}`,
 * `TopK {k, axis, largest}`, `Select {index}`, reductions `{axes?, keepdims}`,
 * `Concat {axis}`, `Cast {to}`, `Reshape {shape}`, `Transpose {perm?}`,
 * `Unsqueeze/Squeeze {axes}`, `Index/SetIndex {items}`, `Expand {shape}`.
 *
 * @example
 * import * as Ops from "./Ops.js"
 * Ops.arity.MatMul // 2
 *
 * @since 0.1.0
 */

/**
 * Every operation name.
 *
 * @since 0.1.0
 */
export const names = [
  "Add",
  "Sub",
  "Mul",
  "Div",
  "Pow",
  "Mod",
  "Neg",
  "Abs",
  "Exp",
  "Log",
  "Sqrt",
  "Tanh",
  "Sigmoid",
  "Relu",
  "MatMul",
  "Softmax",
  "LogSoftmax",
  "ArgMax",
  "TopK",
  "Select",
  "ReduceSum",
  "ReduceMean",
  "ReduceMax",
  "ReduceL2",
  "Identity",
  "Concat",
  "Equal",
  "Less",
  "LessOrEqual",
  "Greater",
  "GreaterOrEqual",
  "Not",
  "And",
  "Or",
  "Where",
  "Cast",
  "Reshape",
  "Transpose",
  "Unsqueeze",
  "Squeeze",
  "Index",
  "SetIndex",
  "Shape",
  "Expand"
] as const

/**
 * An operation name.
 *
 * @since 0.1.0
 */
export type OpName = (typeof names)[number]

/**
 * How many arguments each operation takes (`"many"`: one or more).
 *
 * @since 0.1.0
 */
export const arity = {
  Add: 2,
  Sub: 2,
  Mul: 2,
  Div: 2,
  Pow: 2,
  Mod: 2,
  Neg: 1,
  Abs: 1,
  Exp: 1,
  Log: 1,
  Sqrt: 1,
  Tanh: 1,
  Sigmoid: 1,
  Relu: 1,
  MatMul: 2,
  Softmax: 1,
  LogSoftmax: 1,
  ArgMax: 1,
  TopK: 1,
  Select: 1,
  ReduceSum: 1,
  ReduceMean: 1,
  ReduceMax: 1,
  ReduceL2: 1,
  Identity: 1,
  Concat: "many",
  Equal: 2,
  Less: 2,
  LessOrEqual: 2,
  Greater: 2,
  GreaterOrEqual: 2,
  Not: 1,
  And: 2,
  Or: 2,
  Where: 3,
  Cast: 1,
  Reshape: 1,
  Transpose: 1,
  Unsqueeze: 1,
  Squeeze: 1,
  Index: 1,
  SetIndex: 2,
  Shape: 1,
  Expand: 1
} as const satisfies Record<OpName, number | "many">

/**
 * Elementwise binary operations whose operands broadcast, NumPy-style, and
 * whose scalar operands take the other operand's dtype.
 *
 * @since 0.1.0
 */
export const broadcasting: ReadonlySet<OpName> = new Set<OpName>([
  "Add",
  "Sub",
  "Mul",
  "Div",
  "Pow",
  "Mod",
  "Equal",
  "Less",
  "LessOrEqual",
  "Greater",
  "GreaterOrEqual",
  "And",
  "Or",
  "Where"
])

/**
 * Whether a string is an operation name.
 *
 * @since 0.1.0
 */
export const isOpName = (s: string): s is OpName => (names as ReadonlyArray<string>).includes(s)
