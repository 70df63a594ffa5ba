/**
 * Recognises what kind of PyTorch module a scope was (Linear, Embedding,
 * LayerNorm, RMSNorm, activations, ModuleList) from its operators and
 * parameters, for printing the tree and naming parameters (`.weight`).
 * The exporter keeps no class names, so this is inference; loaders may
 * override the names (see `ModuleTree.Options.typeNames`).
 *
 * @example
 * import * as Describe from "./Describe.js"
 * Describe.infer("lm_head", ownNodes, [], initializers).type // "Linear"
 *
 * @since 0.1.0
 */
import type * as ModuleTree from "./ModuleTree.js"

interface InitLike {
  readonly name: string
  readonly dims: ReadonlyArray<number | bigint>
}

/**
 * What {@link infer} finds.
 *
 * @since 0.1.0
 */
export interface Description {
  readonly type: string
  readonly extra: string
  readonly parameters: ReadonlyArray<ModuleTree.Parameter>
}

const dimsOf = (t: InitLike): ReadonlyArray<number> => t.dims.map(Number)

const opsOf = (nodes: ReadonlyArray<ModuleTree.NodeLike>): ReadonlySet<string> =>
  new Set(nodes.map((n) => n.opType).filter((op) => op !== "Constant" && op !== "Identity" && op !== "Shape"))

const onlyOps = (ops: ReadonlySet<string>, allowed: ReadonlyArray<string>): boolean =>
  ops.size > 0 && [...ops].every((op) => allowed.includes(op))

/**
 * Infers a module's class name, repr arguments and named parameters.
 *
 * @example
 * Describe.infer("model.embed_tokens", [gatherNode], [], inits)
 * // { type: "Embedding", extra: "512, 64", parameters: [{ name: "weight", ... }] }
 *
 * @since 0.1.0
 */
export const infer = (
  path: string,
  own: ReadonlyArray<ModuleTree.NodeLike>,
  children: ReadonlyArray<ModuleTree.Module>,
  initializers: ReadonlyMap<string, InitLike>
): Description => {
  const params = new Map<string, ModuleTree.Parameter>()
  const add = (name: string, initializer: string, transposed = false) => {
    if (!params.has(name) && ![...params.values()].some((p) => p.initializer === initializer)) {
      params.set(name, { name, initializer, transposed })
    }
  }
  const used = own.flatMap((n) => n.inputs.filter((i) => initializers.has(i)))
  // Initializers that kept their PyTorch names are named directly.
  const prefix = path === "" ? "" : path + "."
  for (const name of used) {
    const rest = name.startsWith(prefix) ? name.slice(prefix.length) : undefined
    if (rest !== undefined && rest !== "" && !rest.includes(".")) add(rest, name)
  }
  const ops = opsOf(own)
  const leaf = children.length === 0

  if (leaf) {
    const embedding = own.find((n) => n.opType === "Gather" && initializers.has(n.inputs[0]))
    if (embedding && dimsOf(initializers.get(embedding.inputs[0])!).length === 2) {
      const [num, dim] = dimsOf(initializers.get(embedding.inputs[0])!)
      add("weight", embedding.inputs[0])
      return { type: "Embedding", extra: `${num}, ${dim}`, parameters: [...params.values()] }
    }
    const linear = linearOf(own, initializers)
    if (linear && onlyOps(ops, ["MatMul", "Gemm", "Add", "Transpose"])) {
      add("weight", linear.weight, linear.transposed)
      if (linear.bias) add("bias", linear.bias)
      return {
        type: "Linear",
        extra: `in_features=${linear.inFeatures}, out_features=${linear.outFeatures}, bias=${linear.bias ? "True" : "False"}`,
        parameters: [...params.values()]
      }
    }
    const vectors = used.filter((n) => dimsOf(initializers.get(n)!).length === 1)
    if (ops.has("LayerNormalization") || (ops.has("ReduceMean") && ops.has("Sub") && (ops.has("Pow") || ops.has("Mul")))) {
      const dim = vectors.length > 0 ? dimsOf(initializers.get(vectors[0])!)[0] : undefined
      if (vectors[0]) add("weight", vectors[0])
      if (vectors[1]) add("bias", vectors[1])
      return {
        type: "LayerNorm",
        extra: dim === undefined ? "" : `(${dim},), eps=1e-05, elementwise_affine=True`,
        parameters: [...params.values()]
      }
    }
    if (ops.has("ReduceMean") && (ops.has("Sqrt") || ops.has("Reciprocal")) && !ops.has("Sub")) {
      const dim = vectors.length > 0 ? dimsOf(initializers.get(vectors[0])!)[0] : undefined
      if (vectors[0]) add("weight", vectors[0])
      return { type: "RMSNorm", extra: dim === undefined ? "" : `(${dim},)`, parameters: [...params.values()] }
    }
    const activation = activationOf(ops)
    if (activation) return { type: activation, extra: "", parameters: [...params.values()] }
  }
  if (own.length === 0 && children.length > 0 && children.every((c) => /^\d+$/.test(c.name))) {
    return { type: "ModuleList", extra: "", parameters: [] }
  }
  return { type: path === "" ? "Model" : "Module", extra: "", parameters: [...params.values()] }
}

const activationOf = (ops: ReadonlySet<string>): string | undefined => {
  if (onlyOps(ops, ["Sigmoid", "Mul"]) && ops.has("Sigmoid")) return ops.has("Mul") ? "SiLU" : "Sigmoid"
  if (onlyOps(ops, ["Relu"])) return "ReLU"
  if (onlyOps(ops, ["Gelu"]) || (ops.has("Erf") && onlyOps(ops, ["Erf", "Div", "Add", "Mul"]))) return "GELU"
  if (ops.has("Tanh") && ops.has("Pow") && onlyOps(ops, ["Tanh", "Pow", "Mul", "Add"])) return "NewGELUActivation"
  if (onlyOps(ops, ["Tanh"])) return "Tanh"
  if (onlyOps(ops, ["Softmax"])) return "Softmax"
  return undefined
}

interface Linear {
  readonly weight: string
  readonly transposed: boolean
  readonly bias: string | undefined
  readonly inFeatures: number
  readonly outFeatures: number
}

const linearOf = (
  own: ReadonlyArray<ModuleTree.NodeLike>,
  initializers: ReadonlyMap<string, InitLike>
): Linear | undefined => {
  const matmul = own.find((n) => (n.opType === "MatMul" || n.opType === "Gemm") && n.inputs.length >= 2)
  if (!matmul) return undefined
  let weightName = matmul.inputs[1]
  // A tied or pre-transposed weight arrives through a Transpose of an initializer.
  const transposeNode = own.find((n) => n.opType === "Transpose" && n.outputs[0] === weightName)
  let transposed = matmul.opType === "MatMul"
  if (transposeNode && initializers.has(transposeNode.inputs[0])) {
    weightName = transposeNode.inputs[0]
    transposed = !transposed
  }
  const weight = initializers.get(weightName)
  if (!weight || dimsOf(weight).length !== 2) return undefined
  const [a, b] = dimsOf(weight)
  // Gemm's weight is [out, in] when transB=1 (the exporter's choice for Linear)
  const [inFeatures, outFeatures] = transposed ? [a, b] : [b, a]
  const biasName =
    matmul.opType === "Gemm"
      ? matmul.inputs[2]
      : own.find((n) => n.opType === "Add" && n.inputs.some((i) => initializers.has(i)))?.inputs.find((i) =>
          initializers.has(i)
        )
  const bias = biasName !== undefined && biasName !== "" && initializers.has(biasName) ? biasName : undefined
  return { weight: weightName, transposed, bias, inFeatures, outFeatures }
}
