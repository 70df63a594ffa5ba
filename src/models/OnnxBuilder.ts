/**
 * A small builder that writes ONNX graphs from TypeScript: for tests, for
 * graph surgery on decoded models, and for generating benchmark models.
 * Methods return tensor names, so graphs read like the code that computes
 * them; `build()` returns a fresh, frozen {@link Onnx.Model}.
 *
 * @example
 * import * as OnnxBuilder from "./OnnxBuilder.js"
 * const b = OnnxBuilder.make({ opset: 14 })
 * const x = b.input("x", "float32", [2, "n"])
 * const w = b.initializer("w", "float32", [3, 4], new Float32Array(12))
 * const y = b.node("MatMul", [x, w], { name: "/layer1/MatMul" })
 * const [a, c] = b.node("Split", [y], { outputs: 2, attributes: { axis: 1n } })
 * b.output(a, "float32", [2, 2])
 * const bytes = Onnx.encode(b.build())
 *
 * @since 0.1.0
 */
import * as DType from "../core/DType.js"
import * as Onnx from "./Onnx.js"

/**
 * Model-level settings of a builder.
 *
 * @example
 * OnnxBuilder.make({ opset: 17, opsets: { "com.microsoft": 1 }, graphName: "mlp" })
 *
 * @since 0.1.0
 */
export interface Options {
  /** Version of the default ONNX opset (domain ""); default 14. */
  readonly opset?: number | bigint
  /** Further opsets by domain. */
  readonly opsets?: Readonly<Record<string, number | bigint>>
  /** Default 8 (the first IR version with model-local functions). */
  readonly irVersion?: bigint
  readonly graphName?: string
  readonly producerName?: string
  readonly producerVersion?: string
  readonly domain?: string
  readonly modelVersion?: bigint
  readonly docString?: string
  readonly metadata?: Readonly<Record<string, string>>
}

/**
 * Settings of one node. `outputs` is a count of outputs to name (their
 * names are generated from the node name) or the names themselves; without
 * it the node has one generated output. `attributes` maps names to values
 * whose ONNX type is inferred (number: FLOAT, bigint: INT, string: STRING,
 * lists, tensors, graphs; see `Onnx.AttributeValue`), or is a list of
 * ready attributes (for empty lists or references in function bodies).
 *
 * @example
 * const opts: OnnxBuilder.NodeOptions = { name: "/mlp/Gemm", attributes: { transB: 1n, alpha: 0.5 } }
 *
 * @since 0.1.0
 */
export interface NodeOptions {
  readonly name?: string
  readonly domain?: string
  readonly overload?: string
  readonly outputs?: number | ReadonlyArray<string>
  readonly attributes?: Readonly<Record<string, Onnx.AttributeValue>> | ReadonlyArray<Onnx.Attribute>
  readonly docString?: string
}

/**
 * A model-local function to define: its name, domain, input names,
 * attribute parameters (`attributes` without defaults, `attributeDefaults`
 * with), and opsets its body uses (default: the model's default opset).
 *
 * @example
 * const spec: OnnxBuilder.FunctionSpec = { name: "Double", domain: "local", inputs: ["x"] }
 *
 * @since 0.1.0
 */
export interface FunctionSpec {
  readonly name: string
  readonly domain: string
  readonly inputs: ReadonlyArray<string>
  readonly attributes?: ReadonlyArray<string>
  readonly attributeDefaults?: Readonly<Record<string, Onnx.AttributeValue>>
  readonly opsets?: Readonly<Record<string, number | bigint>>
  readonly docString?: string
}

/**
 * An element type: a dtype name, or an ONNX `TensorProto.DataType` code for
 * types without one (bfloat16, float8, ...).
 *
 * @example
 * const t: OnnxBuilder.ElemType = "float32" // or 16 (bfloat16)
 *
 * @since 0.1.0
 */
export type ElemType = DType.DType | number

/**
 * A graph under construction. Names given explicitly are used as they are
 * (a tensor defined twice, or two nodes of one name, is an error); generated
 * names never collide with any name in the graph, its subgraphs, or its
 * parents.
 *
 * @example
 * const b = OnnxBuilder.make()
 * const y = b.node("Relu", [b.input("x", "float32", [4])])
 * b.output(y, "float32", [4])
 *
 * @since 0.1.0
 */
export interface Builder {
  /** Declares a graph input; returns its name. */
  input(name: string, elemType: ElemType, shape?: ReadonlyArray<Onnx.DimLike>): string
  /** Adds an initializer from data (copied once, into `raw_data`); returns its name. */
  initializer(name: string, dtype: DType.DType, dims: ReadonlyArray<number>, data: Onnx.TensorDataLike): string
  /** Adds a ready initializer tensor; returns its name. */
  addInitializer(tensor: Onnx.TensorProto): string
  /** Adds a node with one generated output; returns the output's name. */
  node(opType: string, inputs: ReadonlyArray<string>, options?: NodeOptions & { readonly outputs?: undefined }): string
  /** Adds a node with the given outputs; returns their names. */
  node(
    opType: string,
    inputs: ReadonlyArray<string>,
    options: NodeOptions & { readonly outputs: number | ReadonlyArray<string> }
  ): ReadonlyArray<string>
  /** Declares a graph output (type optional inside subgraphs); returns its name. */
  output(name: string, elemType?: ElemType, shape?: ReadonlyArray<Onnx.DimLike>): string
  /** Declares the type of an intermediate value; returns its name. */
  valueInfo(name: string, elemType: ElemType, shape?: ReadonlyArray<Onnx.DimLike>): string
  /** Imports an opset (replacing the version of an imported domain). */
  opset(domain: string, version: number | bigint): void
  /** Builds a subgraph (If branch, Loop body) whose names stay clear of this graph's. */
  subgraph(name: string, body: (g: Builder) => void): Onnx.Graph
  /** Defines a model-local function; `body` gets the input names and returns the output names. */
  defineFunction(spec: FunctionSpec, body: (f: Builder, ...inputs: Array<string>) => string | ReadonlyArray<string>): Onnx.FunctionProto
  /** Adds a ready function. */
  addFunction(f: Onnx.FunctionProto): void
  /** A tensor name not yet used in this scope, derived from `base`. */
  fresh(base: string): string
  /** A node name not yet used in this scope, derived from `base`. */
  freshNode(base: string): string
  /** The graph so far, frozen. */
  graph(): Onnx.Graph
  /** The model so far, frozen (root builders only). */
  build(): Onnx.Model
}

// Names shared by a graph and all its subgraphs: onnxruntime resolves
// subgraph names against outer scopes, so generated names must be unique
// across the whole nest.
interface Scope {
  readonly values: Set<string>
  readonly nodes: Set<string>
}

interface ModelState {
  readonly opsets: Map<string, bigint>
  readonly functions: Array<Onnx.FunctionProto>
  readonly metadata: Array<Onnx.StringEntry>
  readonly base: Omit<Onnx.Model, "graph" | "opsetImports" | "functions" | "metadataProps">
}

interface GraphState {
  name: string
  readonly nodes: Array<Onnx.Node>
  readonly initializers: Array<Onnx.TensorProto>
  readonly inputs: Array<Onnx.ValueInfo>
  readonly outputs: Array<Onnx.ValueInfo>
  readonly valueInfos: Array<Onnx.ValueInfo>
  // Kept from a model given to `from`, so surgery loses nothing.
  readonly rest: Pick<Onnx.Graph, "sparseInitializers" | "docString" | "quantizationAnnotations" | "metadataProps">
}

const fail = (message: string) => new Onnx.OnnxError({ message })

const codeOf = (t: ElemType): number => (typeof t === "number" ? t : DType.toOnnx(t))

const unique = (base: string, taken: Set<string>): string => {
  if (!taken.has(base)) return base
  for (let k = 1; ; k++) if (!taken.has(`${base}_${k}`)) return `${base}_${k}`
}

const toAttributes = (attrs: NodeOptions["attributes"]): ReadonlyArray<Onnx.Attribute> =>
  attrs === undefined
    ? []
    : Array.isArray(attrs)
    ? (attrs as ReadonlyArray<Onnx.Attribute>)
    : Object.entries(attrs as Readonly<Record<string, Onnx.AttributeValue>>).map(([k, v]) => Onnx.attribute(k, v))

const valueInfoOf = (name: string, elemType: ElemType | undefined, shape?: ReadonlyArray<Onnx.DimLike>): Onnx.ValueInfo =>
  elemType === undefined
    ? Object.freeze({ name, docString: "", metadataProps: Object.freeze([]) })
    : Onnx.tensorValueInfo(name, codeOf(elemType), shape)

const makeBuilder = (model: ModelState | undefined, scope: Scope, state: GraphState, root: () => ModelState): Builder => {
  const define = (name: string): string => {
    if (name === "") throw fail("tensor names must not be empty")
    if (scope.values.has(name)) throw fail(`tensor "${name}" is already defined`)
    scope.values.add(name)
    return name
  }

  const graph = (): Onnx.Graph =>
    Object.freeze({
      name: state.name,
      nodes: Object.freeze([...state.nodes]),
      initializers: Object.freeze([...state.initializers]),
      sparseInitializers: state.rest.sparseInitializers,
      inputs: Object.freeze([...state.inputs]),
      outputs: Object.freeze([...state.outputs]),
      valueInfos: Object.freeze([...state.valueInfos]),
      docString: state.rest.docString,
      quantizationAnnotations: state.rest.quantizationAnnotations,
      metadataProps: state.rest.metadataProps
    })

  const builder: Builder = {
    input: (name, elemType, shape) => {
      state.inputs.push(valueInfoOf(define(name), elemType, shape))
      return name
    },
    initializer: (name, dtype, dims, data) => builder.addInitializer(Onnx.makeTensor(name, dtype, dims, data)),
    addInitializer: (tensor) => {
      define(tensor.name)
      state.initializers.push(tensor)
      return tensor.name
    },
    node: ((opType: string, inputs: ReadonlyArray<string>, options: NodeOptions = {}) => {
      // onnxruntime rejects a model with two nodes of the same (non-empty) name.
      if (options.name !== undefined && options.name !== "" && scope.nodes.has(options.name)) {
        throw fail(`node name "${options.name}" is already used`)
      }
      const name = options.name ?? unique(opType, scope.nodes)
      scope.nodes.add(name)
      const spec = options.outputs
      const outputs =
        typeof spec === "object"
          ? spec.map((o) => (o === "" ? o : define(o)))
          : Array.from({ length: spec ?? 1 }, (_, k) => define(unique(`${name}_output_${k}`, scope.values)))
      state.nodes.push(
        Object.freeze({
          name,
          opType,
          domain: options.domain ?? "",
          overload: options.overload ?? "",
          inputs: Object.freeze([...inputs]),
          outputs: Object.freeze(outputs),
          attributes: Object.freeze([...toAttributes(options.attributes)]),
          docString: options.docString ?? "",
          metadataProps: Object.freeze([]),
          deviceConfigurations: Object.freeze([])
        })
      )
      return spec === undefined ? outputs[0] : Object.freeze(outputs)
    }) as Builder["node"],
    output: (name, elemType, shape) => {
      if (state.outputs.some((o) => o.name === name)) throw fail(`"${name}" is already an output`)
      state.outputs.push(valueInfoOf(name, elemType, shape))
      return name
    },
    valueInfo: (name, elemType, shape) => {
      state.valueInfos.push(valueInfoOf(name, elemType, shape))
      return name
    },
    opset: (domain, version) => {
      root().opsets.set(domain, BigInt(version))
    },
    subgraph: (name, body) => {
      const child = makeBuilder(undefined, scope, emptyState(name), root)
      body(child)
      return child.graph()
    },
    defineFunction: (spec, body) => {
      // A function body is its own namespace: fresh scope, inputs predefined.
      const fscope: Scope = { values: new Set(spec.inputs), nodes: new Set() }
      const fstate = emptyState(spec.name)
      const fb = makeBuilder(undefined, fscope, fstate, root)
      const result = body(fb, ...spec.inputs)
      const outputs = typeof result === "string" ? [result] : [...result]
      const m = root()
      const opsets = spec.opsets ?? { "": m.opsets.get("") ?? 14n }
      const f: Onnx.FunctionProto = Object.freeze({
        name: spec.name,
        domain: spec.domain,
        overload: "",
        inputs: Object.freeze([...spec.inputs]),
        outputs: Object.freeze(outputs),
        attributes: Object.freeze([...(spec.attributes ?? [])]),
        attributeProtos: Object.freeze(
          Object.entries(spec.attributeDefaults ?? {}).map(([k, v]) => Onnx.attribute(k, v))
        ),
        nodes: Object.freeze([...fstate.nodes]),
        docString: spec.docString ?? "",
        opsetImports: Object.freeze(
          Object.entries(opsets).map(([domain, version]) => Object.freeze({ domain, version: BigInt(version) }))
        ),
        valueInfos: Object.freeze([...fstate.valueInfos]),
        metadataProps: Object.freeze([])
      })
      builder.addFunction(f)
      return f
    },
    addFunction: (f) => {
      const m = root()
      m.functions.push(f)
      // Calls to the function name its domain; the model must import it.
      if (!m.opsets.has(f.domain)) m.opsets.set(f.domain, 1n)
    },
    fresh: (base) => unique(base, scope.values),
    freshNode: (base) => unique(base, scope.nodes),
    graph,
    build: () => {
      if (model === undefined) throw fail("build() is for the root builder; subgraph builders give graph()")
      return Object.freeze({
        ...model.base,
        opsetImports: Object.freeze(
          [...model.opsets].map(([domain, version]) => Object.freeze({ domain, version }))
        ),
        graph: graph(),
        functions: Object.freeze([...model.functions]),
        metadataProps: Object.freeze([...model.metadata])
      })
    }
  }
  return builder
}

const emptyState = (name: string): GraphState => {
  const g = Onnx.emptyGraph(name)
  return { name, nodes: [], initializers: [], inputs: [], outputs: [], valueInfos: [], rest: g }
}

/**
 * A builder for a new model.
 *
 * @example
 * const b = OnnxBuilder.make({ opset: 14 })
 * const y = b.node("Neg", [b.input("x", "float32", [3])])
 * b.output(y, "float32", [3])
 * const model = b.build()
 *
 * @since 0.1.0
 */
export const make = (options: Options = {}): Builder => {
  const opsets = new Map<string, bigint>([["", BigInt(options.opset ?? 14)]])
  for (const [domain, version] of Object.entries(options.opsets ?? {})) opsets.set(domain, BigInt(version))
  const state: ModelState = {
    opsets,
    functions: [],
    metadata: Object.entries(options.metadata ?? {}).map(([key, value]) => Object.freeze({ key, value })),
    base: {
      irVersion: options.irVersion ?? 8n,
      producerName: options.producerName ?? "nnsight-ts",
      producerVersion: options.producerVersion ?? "",
      domain: options.domain ?? "",
      modelVersion: options.modelVersion ?? 0n,
      docString: options.docString ?? "",
      trainingInfo: Object.freeze([]),
      configurations: Object.freeze([])
    }
  }
  return makeBuilder(state, { values: new Set(), nodes: new Set() }, emptyState(options.graphName ?? "main"), () => state)
}

const namesOf = (graph: Onnx.Graph, scope: Scope): void => {
  for (const v of graph.inputs) scope.values.add(v.name)
  for (const t of graph.initializers) scope.values.add(t.name)
  for (const n of graph.nodes) {
    scope.nodes.add(n.name)
    for (const o of n.outputs) if (o !== "") scope.values.add(o)
    for (const g of Onnx.subgraphs(n)) namesOf(g, scope)
  }
}

/**
 * A builder that starts from an existing model, for graph surgery: add
 * nodes, outputs (e.g. expose an intermediate tensor), initializers; every
 * other field of the model is kept.
 *
 * @example
 * const b = OnnxBuilder.from(Onnx.decode(bytes))
 * b.output("/model/layers.0/Add_1_output_0", "float32")
 * const patched = Onnx.encode(b.build())
 *
 * @since 0.1.0
 */
export const from = (model: Onnx.Model): Builder => {
  const opsets = new Map(model.opsetImports.map((o) => [o.domain, o.version] as const))
  const state: ModelState = {
    opsets,
    functions: [...model.functions],
    metadata: [...model.metadataProps],
    base: {
      irVersion: model.irVersion,
      producerName: model.producerName,
      producerVersion: model.producerVersion,
      domain: model.domain,
      modelVersion: model.modelVersion,
      docString: model.docString,
      trainingInfo: model.trainingInfo,
      configurations: model.configurations
    }
  }
  const g = model.graph
  const scope: Scope = { values: new Set(), nodes: new Set() }
  namesOf(g, scope)
  const graphState: GraphState = {
    name: g.name,
    nodes: [...g.nodes],
    initializers: [...g.initializers],
    inputs: [...g.inputs],
    outputs: [...g.outputs],
    valueInfos: [...g.valueInfos],
    rest: g
  }
  return makeBuilder(state, scope, graphState, () => state)
}
