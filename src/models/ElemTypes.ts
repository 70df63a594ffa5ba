/**
 * Element-type inference for every tensor of an ONNX graph, so that any cut
 * of the graph (a segment) can declare typed inputs and outputs, as
 * onnxruntime requires. Rules live in a typed table: an operator without a
 * rule is a compile error when added to {@link OpName}, and a graph using an
 * unknown operator gets a typed error naming it.
 *
 * @example
 * import * as ElemTypes from "./ElemTypes.js"
 * const types = ElemTypes.infer(model.graph)   // Map tensor name -> ONNX elem type
 * types.get("logits") // 1 (float)
 *
 * @since 0.1.0
 */
import { Data } from "effect"
import { OnnxCode } from "../core/DType.js"
import * as Onnx from "./Onnx.js"

/**
 * An operator the graph uses that no rule covers (and no value info types).
 *
 * @since 0.1.0
 */
export class UnknownOperator extends Data.TaggedError("UnknownOperator")<{
  readonly opType: string
  readonly domain: string
  readonly node: string
}> {
  override get message(): string {
    return `no element-type rule for operator ${this.domain === "" ? "" : this.domain + "."}${this.opType} (node "${this.node}"), and the model declares no type for its outputs`
  }
}

type Rule = (inputs: ReadonlyArray<number | undefined>, node: Onnx.Node) => ReadonlyArray<number | undefined>

const same: Rule = (inputs, node) => node.outputs.map(() => inputs[0])
const second: Rule = (inputs, node) => node.outputs.map(() => inputs[1])
const bool: Rule = (_, node) => node.outputs.map(() => OnnxCode.BOOL)
const int64: Rule = (_, node) => node.outputs.map(() => OnnxCode.INT64)
const castTo: Rule = (_, node) => [Number(Onnx.attrInt(node, "to") ?? 0n)]
const dtypeAttr =
  (fallback: number): Rule =>
  (_, node) =>
    node.outputs.map(() => Number(Onnx.attrInt(node, "dtype") ?? BigInt(fallback)))

const constantRule: Rule = (_, node) => {
  const t = Onnx.attrTensor(node, "value")
  if (t) return [t.dataType]
  const has = (name: string) => node.attributes.some((a) => a.name === name)
  if (has("value_float") || has("value_floats")) return [OnnxCode.FLOAT]
  if (has("value_int") || has("value_ints")) return [OnnxCode.INT64]
  if (has("value_string") || has("value_strings")) return [OnnxCode.STRING]
  return [undefined]
}

const ifRule: Rule = (_, node) => {
  const g = Onnx.attrGraph(node, "then_branch")
  return node.outputs.map((_, k) => (g?.outputs[k] ? Onnx.tensorType(g.outputs[k])?.elemType : undefined))
}

/**
 * Rules by operator. Keys are the operators nnsight-ts knows.
 *
 * @since 0.1.0
 */
export const rules = {
  Abs: same,
  Acos: same,
  Add: same,
  And: bool,
  ArgMax: int64,
  ArgMin: int64,
  Asin: same,
  Atan: same,
  BatchNormalization: same,
  Cast: castTo,
  CastLike: second,
  Ceil: same,
  Celu: same,
  Clip: same,
  Concat: same,
  Constant: constantRule,
  ConstantOfShape: (_, node) => [Onnx.attrTensor(node, "value")?.dataType ?? OnnxCode.FLOAT],
  Conv: same,
  Cos: same,
  Cosh: same,
  CumSum: same,
  DequantizeLinear: () => [OnnxCode.FLOAT],
  Div: same,
  Dropout: (inputs, node) => node.outputs.map((_, k) => (k === 0 ? inputs[0] : OnnxCode.BOOL)),
  Einsum: same,
  Elu: same,
  Equal: bool,
  Erf: same,
  Exp: same,
  Expand: same,
  EyeLike: (inputs, node) => [Number(Onnx.attrInt(node, "dtype") ?? BigInt(inputs[0] ?? OnnxCode.FLOAT))],
  Flatten: same,
  Floor: same,
  Gather: same,
  GatherElements: same,
  GatherND: same,
  Gelu: same,
  Gemm: same,
  Greater: bool,
  GreaterOrEqual: bool,
  HardSigmoid: same,
  HardSwish: same,
  Identity: same,
  If: ifRule,
  InstanceNormalization: same,
  IsInf: bool,
  IsNaN: bool,
  LayerNormalization: (inputs, node) => node.outputs.map((_, k) => (k === 0 ? inputs[0] : OnnxCode.FLOAT)),
  LeakyRelu: same,
  Less: bool,
  LessOrEqual: bool,
  Log: same,
  LogSoftmax: same,
  MatMul: same,
  Max: same,
  Mean: same,
  Min: same,
  Mod: same,
  Mul: same,
  Neg: same,
  NonZero: int64,
  Not: bool,
  OneHot: (inputs) => [inputs[2]],
  Or: bool,
  Pad: same,
  Pow: same,
  PRelu: same,
  Range: same,
  Reciprocal: same,
  ReduceL1: same,
  ReduceL2: same,
  ReduceLogSumExp: same,
  ReduceMax: same,
  ReduceMean: same,
  ReduceMin: same,
  ReduceProd: same,
  ReduceSum: same,
  ReduceSumSquare: same,
  Relu: same,
  Reshape: same,
  Resize: same,
  RMSNormalization: same,
  Round: same,
  ScatterElements: same,
  ScatterND: same,
  Selu: same,
  Shape: int64,
  Sigmoid: same,
  Sign: same,
  SimplifiedLayerNormalization: (inputs, node) => node.outputs.map((_, k) => (k === 0 ? inputs[0] : OnnxCode.FLOAT)),
  Sin: same,
  Sinh: same,
  Size: int64,
  Slice: same,
  Softmax: same,
  Softplus: same,
  Softsign: same,
  Split: same,
  Sqrt: same,
  Squeeze: same,
  Sub: same,
  Sum: same,
  Tan: same,
  Tanh: same,
  Tile: same,
  TopK: (inputs) => [inputs[0], OnnxCode.INT64],
  Transpose: same,
  Trilu: same,
  Unsqueeze: same,
  Where: second,
  Xor: bool,
  RandomNormal: dtypeAttr(OnnxCode.FLOAT),
  RandomUniform: dtypeAttr(OnnxCode.FLOAT),
  RandomNormalLike: (inputs, node) => [Number(Onnx.attrInt(node, "dtype") ?? BigInt(inputs[0] ?? OnnxCode.FLOAT))],
  RandomUniformLike: (inputs, node) => [Number(Onnx.attrInt(node, "dtype") ?? BigInt(inputs[0] ?? OnnxCode.FLOAT))]
} as const satisfies Record<string, Rule>

/**
 * The operators with an element-type rule.
 *
 * @since 0.1.0
 */
export type OpName = keyof typeof rules

const isKnown = (op: string): op is OpName => Object.prototype.hasOwnProperty.call(rules, op)

/**
 * Element types (ONNX codes) of every tensor in a graph: graph inputs,
 * initializers, declared value infos, then each node's outputs by rule.
 * Declared types win over inferred ones.
 *
 * @example
 * ElemTypes.infer(graph).get("/model/layers.0/Add_1_output_0") // 1
 *
 * @since 0.1.0
 */
export const infer = (graph: Onnx.Graph, outer?: ReadonlyMap<string, number>): Map<string, number> => {
  const types = new Map<string, number>(outer ?? [])
  for (const t of graph.initializers) types.set(t.name, t.dataType)
  const declared = [...graph.inputs, ...graph.valueInfos, ...graph.outputs]
  for (const v of declared) {
    const elemType = Onnx.tensorType(v)?.elemType
    if (elemType !== undefined && elemType !== 0) types.set(v.name, elemType)
  }
  for (const node of graph.nodes) {
    const allDeclared = node.outputs.every((o) => o === "" || types.has(o))
    if (allDeclared) continue
    if (node.domain !== "" && node.domain !== "ai.onnx") {
      throw new UnknownOperator({ opType: node.opType, domain: node.domain, node: node.name })
    }
    if (!isKnown(node.opType)) throw new UnknownOperator({ opType: node.opType, domain: node.domain, node: node.name })
    const rule: Rule = rules[node.opType]
    const result = rule(
      node.inputs.map((i) => (i === "" ? undefined : types.get(i))),
      node
    )
    node.outputs.forEach((o, k) => {
      if (o !== "" && !types.has(o) && result[k] !== undefined) types.set(o, result[k]!)
    })
  }
  return types
}
