/**
 * The ONNX model IR: an immutable TypeScript picture of an ONNX `ModelProto`,
 * decoded from and encoded to protobuf bytes with the official schema
 * (`proto/onnx.proto`, see {@link OnnxSchema}). Every field of the schema is
 * kept, subgraphs (If/Loop/Scan bodies) are decoded recursively, so
 * `decode(encode(decode(bytes)))` equals `decode(bytes)` and the re-encoded
 * bytes run the same in onnxruntime.
 *
 * Conventions: int64 values are `bigint` (they may hold INT64_MAX, e.g. Slice
 * ends), tensor dims and shape dims are `number`; strings absent in the bytes
 * read as `""`; fields whose presence matters (an attribute's value, a
 * tensor's `raw_data`, a shape) are optional properties.
 *
 * @example
 * import * as Onnx from "./Onnx.js"
 * const model = Onnx.decode(fs.readFileSync("model.onnx"))
 * model.graph.nodes[0].opType                      // "Gather"
 * Onnx.attrInt(model.graph.nodes[3], "axis")       // -1n
 * const bytes = Onnx.encode(model)                 // loads in onnxruntime
 *
 * @since 0.1.0
 */
import { Data } from "effect"
import protobuf from "protobufjs/light.js"
import * as DType from "../core/DType.js"
import * as OnnxSchema from "./OnnxSchema.js"

// ---------------------------------------------------------------------------
// IR
// ---------------------------------------------------------------------------

/**
 * A key/value pair (`StringStringEntryProto`): metadata, external data
 * locations, training bindings.
 *
 * @example
 * const e: Onnx.StringEntry = { key: "location", value: "weights.bin" }
 *
 * @since 0.1.0
 */
export interface StringEntry {
  readonly key: string
  readonly value: string
}

/**
 * An imported operator set (`OperatorSetIdProto`); domain `""` is the
 * default ONNX domain.
 *
 * @example
 * const opset: Onnx.OpsetId = { domain: "", version: 14n }
 *
 * @since 0.1.0
 */
export interface OpsetId {
  readonly domain: string
  readonly version: bigint
}

/**
 * One dimension of a shape: a number, a symbolic parameter, or unknown.
 *
 * @example
 * const batch: Onnx.Dim = { _tag: "Param", param: "batch" }
 * const hidden: Onnx.Dim = { _tag: "Value", value: 64 }
 *
 * @since 0.1.0
 */
export type Dim =
  | { readonly _tag: "Value"; readonly value: number; readonly denotation?: string }
  | { readonly _tag: "Param"; readonly param: string; readonly denotation?: string }
  | { readonly _tag: "Unknown"; readonly denotation?: string }

/**
 * The type of a value (`TypeProto`). For tensors `shape` undefined means
 * unknown rank; `[]` is a scalar. `Unset` is a type with no kind given.
 *
 * @example
 * const t: Onnx.TypeProto = { _tag: "Tensor", elemType: 1, shape: [Onnx.dimParam("n"), Onnx.dimValue(4)] }
 *
 * @since 0.1.0
 */
export type TypeProto =
  | {
      readonly _tag: "Tensor"
      readonly elemType: number
      readonly shape?: ReadonlyArray<Dim>
      readonly denotation?: string
    }
  | {
      readonly _tag: "SparseTensor"
      readonly elemType: number
      readonly shape?: ReadonlyArray<Dim>
      readonly denotation?: string
    }
  | { readonly _tag: "Sequence"; readonly elemType?: TypeProto; readonly denotation?: string }
  | { readonly _tag: "Map"; readonly keyType: number; readonly valueType?: TypeProto; readonly denotation?: string }
  | { readonly _tag: "Optional"; readonly elemType?: TypeProto; readonly denotation?: string }
  | { readonly _tag: "Unset"; readonly denotation?: string }

/**
 * Where a tensor's data lives: in the message, or in an external file named
 * by `externalData`.
 *
 * @example
 * const loc: Onnx.DataLocation = "EXTERNAL"
 *
 * @since 0.1.0
 */
export type DataLocation = "DEFAULT" | "EXTERNAL"

/**
 * The chunk of a large tensor a `TensorProto` holds (`TensorProto.Segment`).
 *
 * @example
 * const s: Onnx.Segment = { begin: 0n, end: 1024n }
 *
 * @since 0.1.0
 */
export interface Segment {
  readonly begin: bigint
  readonly end: bigint
}

/**
 * A serialized tensor (`TensorProto`). Its elements are in `rawData`
 * (little-endian) when present, else in the typed field of its data type;
 * read them with {@link tensorData}, build one with {@link makeTensor}.
 * `rawData` of a decoded model shares memory with the decoded bytes.
 *
 * @example
 * const w = Onnx.makeTensor("w", "float32", [2, 2], Float32Array.of(1, 2, 3, 4))
 * Onnx.tensorData(w) // Float32Array [1, 2, 3, 4]
 *
 * @since 0.1.0
 */
export interface TensorProto {
  readonly name: string
  /** ONNX `TensorProto.DataType` code, see `DType.OnnxCode`. */
  readonly dataType: number
  readonly dims: ReadonlyArray<number>
  readonly segment?: Segment
  readonly floatData: ReadonlyArray<number>
  readonly int32Data: ReadonlyArray<number>
  readonly stringData: ReadonlyArray<Uint8Array>
  readonly int64Data: ReadonlyArray<bigint>
  readonly docString: string
  readonly rawData?: Uint8Array
  readonly externalData: ReadonlyArray<StringEntry>
  readonly dataLocation: DataLocation
  readonly doubleData: ReadonlyArray<number>
  readonly uint64Data: ReadonlyArray<bigint>
  readonly metadataProps: ReadonlyArray<StringEntry>
}

/**
 * A sparse tensor (`SparseTensorProto`): non-default values, their indices,
 * and the dense shape.
 *
 * @example
 * const s: Onnx.SparseTensorProto = { values: Onnx.makeTensor("s", "float32", [1], Float32Array.of(5)), indices: Onnx.makeTensor("", "int64", [1], BigInt64Array.of(3n)), dims: [10] }
 *
 * @since 0.1.0
 */
export interface SparseTensorProto {
  readonly values?: TensorProto
  readonly indices?: TensorProto
  readonly dims: ReadonlyArray<number>
}

/**
 * The kinds of attribute value (`AttributeProto.AttributeType`).
 *
 * @example
 * const k: Onnx.AttributeType = "INTS"
 *
 * @since 0.1.0
 */
export type AttributeType = keyof typeof attributeTypeCodes

/**
 * The ONNX codes of {@link AttributeType}s.
 *
 * @example
 * Onnx.attributeTypeCodes.GRAPH // 5
 *
 * @since 0.1.0
 */
export const attributeTypeCodes = {
  UNDEFINED: 0,
  FLOAT: 1,
  INT: 2,
  STRING: 3,
  TENSOR: 4,
  GRAPH: 5,
  FLOATS: 6,
  INTS: 7,
  STRINGS: 8,
  TENSORS: 9,
  GRAPHS: 10,
  SPARSE_TENSOR: 11,
  SPARSE_TENSORS: 12,
  TYPE_PROTO: 13,
  TYPE_PROTOS: 14
} as const

/**
 * A node attribute (`AttributeProto`). `type` says which value field is in
 * use; the single-value fields are present only when the bytes had them, the
 * list fields are always there (empty when unused). `refAttrName` is set in
 * function bodies for attributes bound to the caller's.
 *
 * @example
 * const axis = Onnx.intAttribute("axis", -1n)
 * axis.type // "INT"
 * axis.i    // -1n
 *
 * @since 0.1.0
 */
export interface Attribute {
  readonly name: string
  readonly refAttrName: string
  readonly docString: string
  readonly type: AttributeType
  readonly f?: number
  readonly i?: bigint
  /** UTF-8 bytes; read with {@link utf8}. */
  readonly s?: Uint8Array
  readonly t?: TensorProto
  readonly g?: Graph
  readonly sparseTensor?: SparseTensorProto
  readonly tp?: TypeProto
  readonly floats: ReadonlyArray<number>
  readonly ints: ReadonlyArray<bigint>
  readonly strings: ReadonlyArray<Uint8Array>
  readonly tensors: ReadonlyArray<TensorProto>
  readonly graphs: ReadonlyArray<Graph>
  readonly sparseTensors: ReadonlyArray<SparseTensorProto>
  readonly typeProtos: ReadonlyArray<TypeProto>
}

/**
 * A named value's declared type (`ValueInfoProto`).
 *
 * @example
 * const x = Onnx.tensorValueInfo("x", 1, [2, "n"])
 *
 * @since 0.1.0
 */
export interface ValueInfo {
  readonly name: string
  readonly type?: TypeProto
  readonly docString: string
  readonly metadataProps: ReadonlyArray<StringEntry>
}

/**
 * A key with a list of ints (`IntIntListEntryProto`), for device groups.
 *
 * @example
 * const e: Onnx.IntIntListEntry = { key: 0n, value: [0n, 1n] }
 *
 * @since 0.1.0
 */
export interface IntIntListEntry {
  readonly key: bigint
  readonly value: ReadonlyArray<bigint>
}

/**
 * How one axis block is split into shards (`SimpleShardedDimProto`); `dim`
 * carries its `dim_value`/`dim_param` choice.
 *
 * @example
 * const s: Onnx.SimpleShardedDim = { dim: Onnx.dimValue(64), numShards: 2n }
 *
 * @since 0.1.0
 */
export interface SimpleShardedDim {
  readonly dim: Dim
  readonly numShards: bigint
}

/**
 * The sharding of one axis (`ShardedDimProto`).
 *
 * @example
 * const d: Onnx.ShardedDim = { axis: 0n, simpleSharding: [] }
 *
 * @since 0.1.0
 */
export interface ShardedDim {
  readonly axis: bigint
  readonly simpleSharding: ReadonlyArray<SimpleShardedDim>
}

/**
 * The sharding of one node input or output (`ShardingSpecProto`).
 *
 * @example
 * const s: Onnx.ShardingSpec = { tensorName: "x", device: [0n, 1n], indexToDeviceGroupMap: [], shardedDim: [] }
 *
 * @since 0.1.0
 */
export interface ShardingSpec {
  readonly tensorName: string
  readonly device: ReadonlyArray<bigint>
  readonly indexToDeviceGroupMap: ReadonlyArray<IntIntListEntry>
  readonly shardedDim: ReadonlyArray<ShardedDim>
}

/**
 * A node's multi-device annotation (`NodeDeviceConfigurationProto`).
 *
 * @example
 * const c: Onnx.NodeDeviceConfiguration = { configurationId: "2gpu", shardingSpec: [], pipelineStage: 0 }
 *
 * @since 0.1.0
 */
export interface NodeDeviceConfiguration {
  readonly configurationId: string
  readonly shardingSpec: ReadonlyArray<ShardingSpec>
  readonly pipelineStage: number
}

/**
 * A multi-device target of the model (`DeviceConfigurationProto`).
 *
 * @example
 * const c: Onnx.DeviceConfiguration = { name: "2gpu", numDevices: 2, device: ["cuda:0", "cuda:1"] }
 *
 * @since 0.1.0
 */
export interface DeviceConfiguration {
  readonly name: string
  readonly numDevices: number
  readonly device: ReadonlyArray<string>
}

/**
 * One operator application (`NodeProto`). PyTorch's exporter names nodes by
 * module scope, e.g. `/model/layers.0/self_attn/q_proj/MatMul`. An empty
 * input name is an omitted optional input.
 *
 * @example
 * const n = model.graph.nodes[0]
 * `${n.opType}(${n.inputs.join(", ")}) -> ${n.outputs.join(", ")}`
 *
 * @since 0.1.0
 */
export interface Node {
  readonly name: string
  readonly opType: string
  readonly domain: string
  readonly overload: string
  readonly inputs: ReadonlyArray<string>
  readonly outputs: ReadonlyArray<string>
  readonly attributes: ReadonlyArray<Attribute>
  readonly docString: string
  readonly metadataProps: ReadonlyArray<StringEntry>
  readonly deviceConfigurations: ReadonlyArray<NodeDeviceConfiguration>
}

/**
 * Quantization parameters of a tensor (`TensorAnnotation`).
 *
 * @example
 * const a: Onnx.TensorAnnotation = { tensorName: "a", quantParameterTensorNames: [{ key: "SCALE_TENSOR", value: "a_scale" }] }
 *
 * @since 0.1.0
 */
export interface TensorAnnotation {
  readonly tensorName: string
  readonly quantParameterTensorNames: ReadonlyArray<StringEntry>
}

/**
 * A computation graph (`GraphProto`), nodes in topological order.
 *
 * @example
 * const g = model.graph
 * g.inputs.map((v) => v.name) // ["input_ids", "attention_mask", ...]
 *
 * @since 0.1.0
 */
export interface Graph {
  readonly name: string
  readonly nodes: ReadonlyArray<Node>
  readonly initializers: ReadonlyArray<TensorProto>
  readonly sparseInitializers: ReadonlyArray<SparseTensorProto>
  readonly inputs: ReadonlyArray<ValueInfo>
  readonly outputs: ReadonlyArray<ValueInfo>
  readonly valueInfos: ReadonlyArray<ValueInfo>
  readonly docString: string
  readonly quantizationAnnotations: ReadonlyArray<TensorAnnotation>
  readonly metadataProps: ReadonlyArray<StringEntry>
}

/**
 * Training steps stored with a model (`TrainingInfoProto`).
 *
 * @example
 * model.trainingInfo.length // 0 for inference exports
 *
 * @since 0.1.0
 */
export interface TrainingInfo {
  readonly initialization?: Graph
  readonly algorithm?: Graph
  readonly initializationBinding: ReadonlyArray<StringEntry>
  readonly updateBinding: ReadonlyArray<StringEntry>
}

/**
 * A model-local function (`FunctionProto`): `attributes` names the
 * parameters without defaults, `attributeProtos` those with defaults.
 *
 * @example
 * const f = model.functions.find((f) => f.name === "MyGelu")
 *
 * @since 0.1.0
 */
export interface FunctionProto {
  readonly name: string
  readonly domain: string
  readonly overload: string
  readonly inputs: ReadonlyArray<string>
  readonly outputs: ReadonlyArray<string>
  readonly attributes: ReadonlyArray<string>
  readonly attributeProtos: ReadonlyArray<Attribute>
  readonly nodes: ReadonlyArray<Node>
  readonly docString: string
  readonly opsetImports: ReadonlyArray<OpsetId>
  readonly valueInfos: ReadonlyArray<ValueInfo>
  readonly metadataProps: ReadonlyArray<StringEntry>
}

/**
 * A whole ONNX model (`ModelProto`).
 *
 * @example
 * const model = Onnx.decode(bytes)
 * model.opsetImports // [{ domain: "", version: 14n }]
 *
 * @since 0.1.0
 */
export interface Model {
  readonly irVersion: bigint
  readonly opsetImports: ReadonlyArray<OpsetId>
  readonly producerName: string
  readonly producerVersion: string
  readonly domain: string
  readonly modelVersion: bigint
  readonly docString: string
  readonly graph: Graph
  readonly metadataProps: ReadonlyArray<StringEntry>
  readonly trainingInfo: ReadonlyArray<TrainingInfo>
  readonly functions: ReadonlyArray<FunctionProto>
  readonly configurations: ReadonlyArray<DeviceConfiguration>
}

/**
 * Bytes that are not a readable ONNX model, or a tensor whose data cannot be
 * read or written as asked.
 *
 * @example
 * try { Onnx.decode(Uint8Array.of(0xff)) } catch (e) { e instanceof Onnx.OnnxError } // true
 *
 * @since 0.1.0
 */
export class OnnxError extends Data.TaggedError("OnnxError")<{
  readonly message: string
  readonly cause?: unknown
}> {}

// ---------------------------------------------------------------------------
// protobuf <-> IR
// ---------------------------------------------------------------------------

let modelType: protobuf.Type | undefined
// Built on first use: importing the IR types should cost nothing.
const ModelProto = (): protobuf.Type => {
  if (modelType === undefined) {
    const root = protobuf.Root.fromJSON(OnnxSchema.descriptor as protobuf.INamespace)
    root.resolveAll()
    modelType = root.lookupType("onnx.ModelProto")
  }
  return modelType
}

// The shape protobufjs gives decoded messages: fields by schema name, absent
// scalars read from prototype defaults, so presence is an own property.
type Raw = { readonly [field: string]: any }
type Long = { readonly low: number; readonly high: number; readonly unsigned?: boolean }

const has = (m: Raw, field: string): boolean => Object.prototype.hasOwnProperty.call(m, field) && m[field] != null

const freeze = Object.freeze

const toBig = (v: Long | number | string, unsigned = false): bigint => {
  if (typeof v === "number" || typeof v === "string") return BigInt(v)
  const bits = (BigInt(v.high >>> 0) << 32n) | BigInt(v.low >>> 0)
  return unsigned ? bits : BigInt.asIntN(64, bits)
}

const toNum = (v: Long | number): number => (typeof v === "number" ? v : v.high * 4294967296 + (v.low >>> 0))

// Buffers decode to Buffer slices; the IR holds plain Uint8Array views.
const bytesOf = (b: Uint8Array): Uint8Array =>
  b.constructor === Uint8Array ? b : new Uint8Array(b.buffer, b.byteOffset, b.byteLength)

const nonEmpty = (s: string): string | undefined => (s === "" ? undefined : s)

const attributeTypeNames: ReadonlyMap<number, AttributeType> = new Map(
  Object.entries(attributeTypeCodes).map(([k, v]) => [v, k as AttributeType])
)

const dEntry = (m: Raw): StringEntry => freeze({ key: m.key, value: m.value })
const dEntries = (ms: ReadonlyArray<Raw>): ReadonlyArray<StringEntry> => freeze(ms.map(dEntry))
const dOpset = (m: Raw): OpsetId => freeze({ domain: m.domain, version: toBig(m.version) })

const dDim = (m: Raw): Dim => {
  const denotation = nonEmpty(m.denotation ?? "")
  const extra = denotation === undefined ? {} : { denotation }
  if (has(m, "dim_value")) return freeze({ _tag: "Value", value: toNum(m.dim_value), ...extra })
  if (has(m, "dim_param")) return freeze({ _tag: "Param", param: m.dim_param, ...extra })
  return freeze({ _tag: "Unknown", ...extra })
}

const dShape = (m: Raw): { shape?: ReadonlyArray<Dim> } =>
  has(m, "shape") ? { shape: freeze(m.shape.dim.map(dDim)) } : {}

const dType = (m: Raw): TypeProto => {
  const denotation = nonEmpty(m.denotation)
  const extra = denotation === undefined ? {} : { denotation }
  if (has(m, "tensor_type")) {
    const t = m.tensor_type
    return freeze({ _tag: "Tensor", elemType: t.elem_type, ...dShape(t), ...extra })
  }
  if (has(m, "sparse_tensor_type")) {
    const t = m.sparse_tensor_type
    return freeze({ _tag: "SparseTensor", elemType: t.elem_type, ...dShape(t), ...extra })
  }
  if (has(m, "sequence_type")) {
    const t = m.sequence_type
    return freeze({ _tag: "Sequence", ...(has(t, "elem_type") ? { elemType: dType(t.elem_type) } : {}), ...extra })
  }
  if (has(m, "map_type")) {
    const t = m.map_type
    return freeze({
      _tag: "Map",
      keyType: t.key_type,
      ...(has(t, "value_type") ? { valueType: dType(t.value_type) } : {}),
      ...extra
    })
  }
  if (has(m, "optional_type")) {
    const t = m.optional_type
    return freeze({ _tag: "Optional", ...(has(t, "elem_type") ? { elemType: dType(t.elem_type) } : {}), ...extra })
  }
  return freeze({ _tag: "Unset", ...extra })
}

const dValueInfo = (m: Raw): ValueInfo =>
  freeze({
    name: m.name,
    ...(has(m, "type") ? { type: dType(m.type) } : {}),
    docString: m.doc_string,
    metadataProps: dEntries(m.metadata_props)
  })

const dataLocations: ReadonlyArray<DataLocation> = ["DEFAULT", "EXTERNAL"]

const dTensor = (m: Raw): TensorProto => {
  const dataLocation = dataLocations[m.data_location]
  if (dataLocation === undefined) {
    throw new OnnxError({ message: `tensor "${m.name}": unknown data_location ${m.data_location}` })
  }
  return freeze({
    name: m.name,
    dataType: m.data_type,
    dims: freeze(m.dims.map(toNum)),
    ...(has(m, "segment") ? { segment: freeze({ begin: toBig(m.segment.begin), end: toBig(m.segment.end) }) } : {}),
    floatData: freeze(m.float_data),
    int32Data: freeze(m.int32_data),
    stringData: freeze(m.string_data.map(bytesOf)),
    int64Data: freeze(m.int64_data.map((v: Long) => toBig(v))),
    docString: m.doc_string,
    ...(has(m, "raw_data") ? { rawData: bytesOf(m.raw_data) } : {}),
    externalData: dEntries(m.external_data),
    dataLocation,
    doubleData: freeze(m.double_data),
    uint64Data: freeze(m.uint64_data.map((v: Long) => toBig(v, true))),
    metadataProps: dEntries(m.metadata_props)
  })
}

const dSparse = (m: Raw): SparseTensorProto =>
  freeze({
    ...(has(m, "values") ? { values: dTensor(m.values) } : {}),
    ...(has(m, "indices") ? { indices: dTensor(m.indices) } : {}),
    dims: freeze(m.dims.map(toNum))
  })

const dAttribute = (m: Raw): Attribute => {
  const type = attributeTypeNames.get(m.type)
  if (type === undefined) throw new OnnxError({ message: `attribute "${m.name}": unknown attribute type ${m.type}` })
  return freeze({
    name: m.name,
    refAttrName: m.ref_attr_name,
    docString: m.doc_string,
    type,
    ...(has(m, "f") ? { f: m.f } : {}),
    ...(has(m, "i") ? { i: toBig(m.i) } : {}),
    ...(has(m, "s") ? { s: bytesOf(m.s) } : {}),
    ...(has(m, "t") ? { t: dTensor(m.t) } : {}),
    ...(has(m, "g") ? { g: dGraph(m.g) } : {}),
    ...(has(m, "sparse_tensor") ? { sparseTensor: dSparse(m.sparse_tensor) } : {}),
    ...(has(m, "tp") ? { tp: dType(m.tp) } : {}),
    floats: freeze(m.floats),
    ints: freeze(m.ints.map((v: Long) => toBig(v))),
    strings: freeze(m.strings.map(bytesOf)),
    tensors: freeze(m.tensors.map(dTensor)),
    graphs: freeze(m.graphs.map(dGraph)),
    sparseTensors: freeze(m.sparse_tensors.map(dSparse)),
    typeProtos: freeze(m.type_protos.map(dType))
  })
}

const dSimpleSharded = (m: Raw): SimpleShardedDim =>
  freeze({
    dim: has(m, "dim_value")
      ? freeze({ _tag: "Value", value: toNum(m.dim_value) })
      : has(m, "dim_param")
      ? freeze({ _tag: "Param", param: m.dim_param })
      : freeze({ _tag: "Unknown" }),
    numShards: toBig(m.num_shards)
  })

const dSharding = (m: Raw): ShardingSpec =>
  freeze({
    tensorName: m.tensor_name,
    device: freeze(m.device.map((v: Long) => toBig(v))),
    indexToDeviceGroupMap: freeze(
      m.index_to_device_group_map.map((e: Raw) =>
        freeze({ key: toBig(e.key), value: freeze(e.value.map((v: Long) => toBig(v))) })
      )
    ),
    shardedDim: freeze(
      m.sharded_dim.map((d: Raw) => freeze({ axis: toBig(d.axis), simpleSharding: freeze(d.simple_sharding.map(dSimpleSharded)) }))
    )
  })

const dNode = (m: Raw): Node =>
  freeze({
    name: m.name,
    opType: m.op_type,
    domain: m.domain,
    overload: m.overload,
    inputs: freeze(m.input),
    outputs: freeze(m.output),
    attributes: freeze(m.attribute.map(dAttribute)),
    docString: m.doc_string,
    metadataProps: dEntries(m.metadata_props),
    deviceConfigurations: freeze(
      m.device_configurations.map((c: Raw) =>
        freeze({
          configurationId: c.configuration_id,
          shardingSpec: freeze(c.sharding_spec.map(dSharding)),
          pipelineStage: c.pipeline_stage
        })
      )
    )
  })

const dGraph = (m: Raw): Graph =>
  freeze({
    name: m.name,
    nodes: freeze(m.node.map(dNode)),
    initializers: freeze(m.initializer.map(dTensor)),
    sparseInitializers: freeze(m.sparse_initializer.map(dSparse)),
    inputs: freeze(m.input.map(dValueInfo)),
    outputs: freeze(m.output.map(dValueInfo)),
    valueInfos: freeze(m.value_info.map(dValueInfo)),
    docString: m.doc_string,
    quantizationAnnotations: freeze(
      m.quantization_annotation.map((a: Raw) =>
        freeze({ tensorName: a.tensor_name, quantParameterTensorNames: dEntries(a.quant_parameter_tensor_names) })
      )
    ),
    metadataProps: dEntries(m.metadata_props)
  })

const dFunction = (m: Raw): FunctionProto =>
  freeze({
    name: m.name,
    domain: m.domain,
    overload: m.overload,
    inputs: freeze(m.input),
    outputs: freeze(m.output),
    attributes: freeze(m.attribute),
    attributeProtos: freeze(m.attribute_proto.map(dAttribute)),
    nodes: freeze(m.node.map(dNode)),
    docString: m.doc_string,
    opsetImports: freeze(m.opset_import.map(dOpset)),
    valueInfos: freeze(m.value_info.map(dValueInfo)),
    metadataProps: dEntries(m.metadata_props)
  })

const dModel = (m: Raw): Model =>
  freeze({
    irVersion: toBig(m.ir_version),
    opsetImports: freeze(m.opset_import.map(dOpset)),
    producerName: m.producer_name,
    producerVersion: m.producer_version,
    domain: m.domain,
    modelVersion: toBig(m.model_version),
    docString: m.doc_string,
    graph: has(m, "graph") ? dGraph(m.graph) : emptyGraph(),
    metadataProps: dEntries(m.metadata_props),
    trainingInfo: freeze(
      m.training_info.map((t: Raw) =>
        freeze({
          ...(has(t, "initialization") ? { initialization: dGraph(t.initialization) } : {}),
          ...(has(t, "algorithm") ? { algorithm: dGraph(t.algorithm) } : {}),
          initializationBinding: dEntries(t.initialization_binding),
          updateBinding: dEntries(t.update_binding)
        })
      )
    ),
    functions: freeze(m.functions.map(dFunction)),
    configurations: freeze(
      m.configuration.map((c: Raw) => freeze({ name: c.name, numDevices: c.num_devices, device: freeze(c.device) }))
    )
  })

const eEntry = (e: StringEntry): Raw => ({ key: e.key, value: e.value })
const eOpset = (o: OpsetId): Raw => ({ domain: nonEmpty(o.domain), version: o.version })

const eDim = (d: Dim): Raw => ({
  ...(d._tag === "Value" ? { dim_value: d.value } : d._tag === "Param" ? { dim_param: d.param } : {}),
  denotation: d.denotation
})

const eShape = (shape: ReadonlyArray<Dim> | undefined): Raw | undefined =>
  shape === undefined ? undefined : { dim: shape.map(eDim) }

const eType = (t: TypeProto): Raw => {
  const denotation = t.denotation
  switch (t._tag) {
    case "Tensor":
      return { tensor_type: { elem_type: t.elemType, shape: eShape(t.shape) }, denotation }
    case "SparseTensor":
      return { sparse_tensor_type: { elem_type: t.elemType, shape: eShape(t.shape) }, denotation }
    case "Sequence":
      return { sequence_type: { elem_type: t.elemType && eType(t.elemType) }, denotation }
    case "Map":
      return { map_type: { key_type: t.keyType, value_type: t.valueType && eType(t.valueType) }, denotation }
    case "Optional":
      return { optional_type: { elem_type: t.elemType && eType(t.elemType) }, denotation }
    case "Unset":
      return { denotation }
  }
}

const eValueInfo = (v: ValueInfo): Raw => ({
  name: v.name,
  type: v.type && eType(v.type),
  doc_string: nonEmpty(v.docString),
  metadata_props: v.metadataProps.map(eEntry)
})

const eTensor = (t: TensorProto): Raw => ({
  dims: t.dims,
  data_type: t.dataType,
  segment: t.segment && { begin: t.segment.begin, end: t.segment.end },
  float_data: t.floatData,
  int32_data: t.int32Data,
  string_data: t.stringData,
  int64_data: t.int64Data,
  name: nonEmpty(t.name),
  doc_string: nonEmpty(t.docString),
  raw_data: t.rawData,
  external_data: t.externalData.map(eEntry),
  data_location: t.dataLocation === "DEFAULT" ? undefined : 1,
  double_data: t.doubleData,
  uint64_data: t.uint64Data,
  metadata_props: t.metadataProps.map(eEntry)
})

const eSparse = (s: SparseTensorProto): Raw => ({
  values: s.values && eTensor(s.values),
  indices: s.indices && eTensor(s.indices),
  dims: s.dims
})

const eAttribute = (a: Attribute): Raw => ({
  name: a.name,
  ref_attr_name: nonEmpty(a.refAttrName),
  doc_string: nonEmpty(a.docString),
  type: attributeTypeCodes[a.type],
  // onnxruntime checks presence (has_i, has_f...), so a present zero is written.
  f: a.f,
  i: a.i,
  s: a.s,
  t: a.t && eTensor(a.t),
  g: a.g && eGraph(a.g),
  sparse_tensor: a.sparseTensor && eSparse(a.sparseTensor),
  tp: a.tp && eType(a.tp),
  floats: a.floats,
  ints: a.ints,
  strings: a.strings,
  tensors: a.tensors.map(eTensor),
  graphs: a.graphs.map(eGraph),
  sparse_tensors: a.sparseTensors.map(eSparse),
  type_protos: a.typeProtos.map(eType)
})

const eNode = (n: Node): Raw => ({
  input: n.inputs,
  output: n.outputs,
  name: nonEmpty(n.name),
  op_type: n.opType,
  domain: nonEmpty(n.domain),
  overload: nonEmpty(n.overload),
  attribute: n.attributes.map(eAttribute),
  doc_string: nonEmpty(n.docString),
  metadata_props: n.metadataProps.map(eEntry),
  device_configurations: n.deviceConfigurations.map((c) => ({
    configuration_id: c.configurationId,
    sharding_spec: c.shardingSpec.map((s) => ({
      tensor_name: s.tensorName,
      device: s.device,
      index_to_device_group_map: s.indexToDeviceGroupMap.map((e) => ({ key: e.key, value: e.value })),
      sharded_dim: s.shardedDim.map((d) => ({
        axis: d.axis,
        simple_sharding: d.simpleSharding.map((x) => ({
          ...(x.dim._tag === "Value" ? { dim_value: x.dim.value } : x.dim._tag === "Param" ? { dim_param: x.dim.param } : {}),
          num_shards: x.numShards
        }))
      }))
    })),
    pipeline_stage: c.pipelineStage
  }))
})

const eGraph = (g: Graph): Raw => ({
  node: g.nodes.map(eNode),
  name: nonEmpty(g.name),
  initializer: g.initializers.map(eTensor),
  sparse_initializer: g.sparseInitializers.map(eSparse),
  doc_string: nonEmpty(g.docString),
  input: g.inputs.map(eValueInfo),
  output: g.outputs.map(eValueInfo),
  value_info: g.valueInfos.map(eValueInfo),
  quantization_annotation: g.quantizationAnnotations.map((a) => ({
    tensor_name: a.tensorName,
    quant_parameter_tensor_names: a.quantParameterTensorNames.map(eEntry)
  })),
  metadata_props: g.metadataProps.map(eEntry)
})

const eFunction = (f: FunctionProto): Raw => ({
  name: f.name,
  input: f.inputs,
  output: f.outputs,
  attribute: f.attributes,
  attribute_proto: f.attributeProtos.map(eAttribute),
  node: f.nodes.map(eNode),
  doc_string: nonEmpty(f.docString),
  opset_import: f.opsetImports.map(eOpset),
  domain: nonEmpty(f.domain),
  overload: nonEmpty(f.overload),
  value_info: f.valueInfos.map(eValueInfo),
  metadata_props: f.metadataProps.map(eEntry)
})

const eModel = (m: Model): Raw => ({
  ir_version: m.irVersion,
  opset_import: m.opsetImports.map(eOpset),
  producer_name: nonEmpty(m.producerName),
  producer_version: nonEmpty(m.producerVersion),
  domain: nonEmpty(m.domain),
  model_version: m.modelVersion === 0n ? undefined : m.modelVersion,
  doc_string: nonEmpty(m.docString),
  graph: eGraph(m.graph),
  metadata_props: m.metadataProps.map(eEntry),
  training_info: m.trainingInfo.map((t) => ({
    initialization: t.initialization && eGraph(t.initialization),
    algorithm: t.algorithm && eGraph(t.algorithm),
    initialization_binding: t.initializationBinding.map(eEntry),
    update_binding: t.updateBinding.map(eEntry)
  })),
  functions: m.functions.map(eFunction),
  configuration: m.configurations.map((c) => ({ name: c.name, num_devices: c.numDevices, device: c.device }))
})

// A two-pass protobuf writer driven by the schema's reflection: sizes first,
// then one exact allocation written once. protobufjs' own writer grows its
// buffer and moves every nested message on closing it, which costs several
// copies of each initializer (seconds for a GPT-2-sized model).

type WireKind = "int32" | "uint32" | "int64" | "uint64" | "bool" | "float" | "double" | "string" | "bytes" | "message"

interface FieldPlan {
  readonly name: string
  readonly kind: WireKind
  readonly repeated: boolean
  readonly packed: boolean
  readonly tag: number
  readonly tagSize: number
  readonly plan?: () => ReadonlyArray<FieldPlan>
}

const plans = new Map<protobuf.Type, ReadonlyArray<FieldPlan>>()

const wireTypes: Readonly<Record<WireKind, number>> = {
  int32: 0,
  uint32: 0,
  int64: 0,
  uint64: 0,
  bool: 0,
  float: 5,
  double: 1,
  string: 2,
  bytes: 2,
  message: 2
}

const planOf = (type: protobuf.Type): ReadonlyArray<FieldPlan> => {
  const known = plans.get(type)
  if (known !== undefined) return known
  const fields = [...type.fieldsArray]
    .sort((a, b) => a.id - b.id)
    .map((f): FieldPlan => {
      const resolved = f.resolvedType
      const kind: WireKind | undefined =
        resolved instanceof protobuf.Type
          ? "message"
          : resolved instanceof protobuf.Enum
          ? "int32"
          : (["int32", "uint32", "int64", "uint64", "bool", "float", "double", "string", "bytes"] as const).find(
              (k) => k === f.type
            )
      if (kind === undefined || f.map) throw new OnnxError({ message: `schema field ${type.name}.${f.name}: unsupported type ${f.type}` })
      const packed = f.repeated && f.packed && kind !== "message" && kind !== "string" && kind !== "bytes"
      const tag = (f.id << 3) | (packed ? 2 : wireTypes[kind])
      return {
        name: f.name,
        kind,
        repeated: f.repeated,
        packed,
        tag,
        tagSize: varintSize(tag),
        ...(resolved instanceof protobuf.Type ? { plan: () => planOf(resolved) } : {})
      }
    })
  plans.set(type, fields)
  return fields
}

const varintSize = (v: number): number => (v < 128 ? 1 : v < 16384 ? 2 : v < 2097152 ? 3 : v < 268435456 ? 4 : 5)

// int64 values arrive as bigint, number (dims) or protobufjs Long.
const int64Parts = (v: bigint | number | Long): readonly [number, number] => {
  if (typeof v === "number") {
    if (v >= 0 && v <= Number.MAX_SAFE_INTEGER) {
      const lo = v >>> 0
      return [lo, (v - lo) / 4294967296]
    }
    return int64Parts(BigInt(Math.trunc(v)))
  }
  if (typeof v === "bigint") return [Number(v & 0xffffffffn), Number((v >> 32n) & 0xffffffffn)]
  return [v.low >>> 0, v.high >>> 0]
}

const varint64Size = (lo: number, hi: number): number => {
  if (hi === 0) return lo < 128 ? 1 : lo < 16384 ? 2 : lo < 2097152 ? 3 : lo < 268435456 ? 4 : 5
  const part1 = ((lo >>> 28) | (hi << 4)) >>> 0
  const part2 = hi >>> 24
  return part2 === 0
    ? part1 < 16384
      ? part1 < 128
        ? 5
        : 6
      : part1 < 2097152
      ? 7
      : 8
    : part2 < 128
    ? 9
    : 10
}

const scalarSize = (kind: WireKind, v: any): number => {
  switch (kind) {
    case "int32":
      return v < 0 ? 10 : varintSize(v)
    case "uint32":
      return varintSize(v >>> 0)
    case "int64":
    case "uint64": {
      const [lo, hi] = int64Parts(v)
      return varint64Size(lo, hi)
    }
    case "bool":
      return 1
    case "float":
      return 4
    case "double":
      return 8
    default:
      throw new OnnxError({ message: `not a scalar: ${kind}` })
  }
}

interface Sink {
  readonly bytes: Uint8Array
  readonly text: Buffer
  readonly view: DataView
  pos: number
  // Sizes of messages from the first pass, by identity.
  readonly sizes: Map<object, number>
}

const lengthOf = (f: FieldPlan, v: any, sizes: Map<object, number>): number => {
  switch (f.kind) {
    case "string":
      return Buffer.byteLength(v, "utf8")
    case "bytes":
      return v.length
    default:
      return messageSize(f.plan!(), v, sizes)
  }
}

const packedLength = (kind: WireKind, v: ReadonlyArray<any>): number => {
  if (kind === "float") return 4 * v.length
  if (kind === "double") return 8 * v.length
  let len = 0
  for (const x of v) len += scalarSize(kind, x)
  return len
}

const messageSize = (plan: ReadonlyArray<FieldPlan>, m: Raw, sizes: Map<object, number>): number => {
  let n = 0
  for (const f of plan) {
    const v = m[f.name]
    if (v == null) continue
    if (!f.repeated) {
      if (f.kind === "string" || f.kind === "bytes" || f.kind === "message") {
        const len = lengthOf(f, v, sizes)
        n += f.tagSize + varintSize(len) + len
      } else n += f.tagSize + scalarSize(f.kind, v)
      continue
    }
    if (v.length === 0) continue
    if (f.packed) {
      const len = packedLength(f.kind, v)
      n += f.tagSize + varintSize(len) + len
    } else if (f.kind === "string" || f.kind === "bytes" || f.kind === "message") {
      for (const x of v) {
        const len = lengthOf(f, x, sizes)
        n += f.tagSize + varintSize(len) + len
      }
    } else {
      for (const x of v) n += f.tagSize + scalarSize(f.kind, x)
    }
  }
  sizes.set(m, n)
  return n
}

const writeVarint = (s: Sink, v: number): void => {
  const b = s.bytes
  while (v > 127) {
    b[s.pos++] = (v & 127) | 128
    v >>>= 7
  }
  b[s.pos++] = v
}

const writeVarint64 = (s: Sink, lo: number, hi: number): void => {
  const b = s.bytes
  while (hi !== 0) {
    b[s.pos++] = (lo & 127) | 128
    lo = ((lo >>> 7) | (hi << 25)) >>> 0
    hi >>>= 7
  }
  writeVarint(s, lo)
}

const writeScalar = (s: Sink, kind: WireKind, v: any): void => {
  switch (kind) {
    case "int32":
      // Negative int32 are sign-extended to ten bytes, as protobuf requires.
      return v < 0 ? writeVarint64(s, v >>> 0, 0xffffffff) : writeVarint(s, v)
    case "uint32":
      return writeVarint(s, v >>> 0)
    case "int64":
    case "uint64": {
      const [lo, hi] = int64Parts(v)
      return writeVarint64(s, lo, hi)
    }
    case "bool":
      s.bytes[s.pos++] = v ? 1 : 0
      return
    case "float":
      s.view.setFloat32(s.pos, v, true)
      s.pos += 4
      return
    case "double":
      s.view.setFloat64(s.pos, v, true)
      s.pos += 8
      return
  }
}

const writeDelimited = (s: Sink, f: FieldPlan, v: any): void => {
  writeVarint(s, f.tag)
  switch (f.kind) {
    case "string": {
      const len = Buffer.byteLength(v, "utf8")
      writeVarint(s, len)
      s.pos += s.text.write(v, s.pos, len, "utf8")
      return
    }
    case "bytes":
      writeVarint(s, v.length)
      s.bytes.set(v, s.pos)
      s.pos += v.length
      return
    default:
      writeVarint(s, s.sizes.get(v)!)
      writeMessage(s, f.plan!(), v)
  }
}

const writeMessage = (s: Sink, plan: ReadonlyArray<FieldPlan>, m: Raw): void => {
  for (const f of plan) {
    const v = m[f.name]
    if (v == null) continue
    const delimited = f.kind === "string" || f.kind === "bytes" || f.kind === "message"
    if (!f.repeated) {
      if (delimited) writeDelimited(s, f, v)
      else {
        writeVarint(s, f.tag)
        writeScalar(s, f.kind, v)
      }
      continue
    }
    if (v.length === 0) continue
    if (f.packed) {
      writeVarint(s, f.tag)
      writeVarint(s, packedLength(f.kind, v))
      for (const x of v) writeScalar(s, f.kind, x)
    } else if (delimited) {
      for (const x of v) writeDelimited(s, f, x)
    } else {
      for (const x of v) {
        writeVarint(s, f.tag)
        writeScalar(s, f.kind, x)
      }
    }
  }
}

/**
 * Decodes ONNX protobuf bytes (a `ModelProto`) into the IR. Tensor data is
 * not copied: `rawData` views the given bytes, so do not mutate them
 * afterwards. Throws {@link OnnxError} on bytes that are not a model.
 *
 * @example
 * const model = Onnx.decode(fs.readFileSync("models/stories260K/onnx/model.onnx"))
 * model.graph.nodes.length // 904
 *
 * @since 0.1.0
 */
export const decode = (bytes: Uint8Array): Model => {
  // A Buffer view makes protobufjs read strings with Node's native UTF-8 decoder.
  const buffer = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength)
  let raw: Raw
  try {
    raw = ModelProto().decode(buffer)
  } catch (cause) {
    throw new OnnxError({ message: `not an ONNX model: ${cause instanceof Error ? cause.message : String(cause)}`, cause })
  }
  return dModel(raw)
}

/**
 * Encodes the IR as ONNX protobuf bytes, loadable by onnxruntime: fields in
 * number order, as protobuf's reference implementation writes them. The
 * result is allocated once at its exact size, and each tensor's data is
 * copied once, into it. Throws {@link OnnxError} past protobuf's 2 GiB.
 *
 * @example
 * const session = await ort.InferenceSession.create(Onnx.encode(model))
 *
 * @since 0.1.0
 */
export const encode = (model: Model): Uint8Array => {
  const plan = planOf(ModelProto())
  const raw = eModel(model)
  const sizes = new Map<object, number>()
  const total = messageSize(plan, raw, sizes)
  // protobuf messages are limited to 2 GiB; onnxruntime refuses larger ones.
  if (total > 2 ** 31 - 1) {
    throw new OnnxError({ message: `model is ${total} bytes, over protobuf's 2 GiB; store weights as external data` })
  }
  const bytes = new Uint8Array(total)
  const sink: Sink = {
    bytes,
    text: Buffer.from(bytes.buffer, 0, total),
    view: new DataView(bytes.buffer),
    pos: 0,
    sizes
  }
  writeMessage(sink, plan, raw)
  if (sink.pos !== total) throw new OnnxError({ message: `internal: wrote ${sink.pos} of ${total} bytes` })
  return bytes
}

// ---------------------------------------------------------------------------
// Constructors and readers
// ---------------------------------------------------------------------------

const textEncoder = new TextEncoder()
const textDecoder = new TextDecoder()

/**
 * Reads UTF-8 bytes (string attributes, string tensors) as a string.
 *
 * @example
 * Onnx.utf8(Onnx.utf8Bytes("tanh")) // "tanh"
 *
 * @since 0.1.0
 */
export const utf8 = (bytes: Uint8Array): string => textDecoder.decode(bytes)

/**
 * The UTF-8 bytes of a string.
 *
 * @example
 * Onnx.utf8Bytes("é") // Uint8Array [0xc3, 0xa9]
 *
 * @since 0.1.0
 */
export const utf8Bytes = (s: string): Uint8Array => textEncoder.encode(s)

/**
 * A fixed dimension.
 *
 * @example
 * Onnx.dimValue(4) // { _tag: "Value", value: 4 }
 *
 * @since 0.1.0
 */
export const dimValue = (value: number): Dim => freeze({ _tag: "Value", value })

/**
 * A symbolic dimension.
 *
 * @example
 * Onnx.dimParam("batch") // { _tag: "Param", param: "batch" }
 *
 * @since 0.1.0
 */
export const dimParam = (param: string): Dim => freeze({ _tag: "Param", param })

/**
 * An unknown dimension (neither value nor parameter).
 *
 * @example
 * Onnx.dimUnknown._tag // "Unknown"
 *
 * @since 0.1.0
 */
export const dimUnknown: Dim = freeze({ _tag: "Unknown" })

/**
 * What shapes may be written as: numbers are fixed dims, strings symbolic
 * ones, `null` unknown ones, or a {@link Dim}.
 *
 * @example
 * const shape: ReadonlyArray<Onnx.DimLike> = ["batch", 5, null]
 *
 * @since 0.1.0
 */
export type DimLike = Dim | number | string | null

/**
 * A {@link Dim} from a {@link DimLike}.
 *
 * @example
 * Onnx.toDim("n") // { _tag: "Param", param: "n" }
 *
 * @since 0.1.0
 */
export const toDim = (d: DimLike): Dim => {
  if (d === null) return dimUnknown
  if (typeof d === "number") return dimValue(d)
  if (typeof d === "string") return dimParam(d)
  // Rebuilt rather than kept: the IR holds only plain frozen objects.
  const extra = d.denotation === undefined || d.denotation === "" ? {} : { denotation: d.denotation }
  return d._tag === "Value"
    ? freeze({ _tag: "Value", value: d.value, ...extra })
    : d._tag === "Param"
    ? freeze({ _tag: "Param", param: d.param, ...extra })
    : freeze({ _tag: "Unknown", ...extra })
}

/**
 * A tensor type; `shape` undefined leaves the rank unknown.
 *
 * @example
 * Onnx.tensorTypeProto(1, [2, "n"]) // float32 [2, n]
 *
 * @since 0.1.0
 */
export const tensorTypeProto = (elemType: number, shape?: ReadonlyArray<DimLike>): TypeProto =>
  freeze({ _tag: "Tensor", elemType, ...(shape === undefined ? {} : { shape: freeze(shape.map(toDim)) }) })

/**
 * A value info of a tensor with the given element type (ONNX code) and,
 * optionally, shape.
 *
 * @example
 * Onnx.tensorValueInfo("logits", 1, [1, "seq", 512])
 *
 * @since 0.1.0
 */
export const tensorValueInfo = (name: string, elemType: number, shape?: ReadonlyArray<DimLike>): ValueInfo =>
  freeze({ name, type: tensorTypeProto(elemType, shape), docString: "", metadataProps: freeze([]) })

/**
 * The element type and shape of a value, when it is declared a tensor.
 *
 * @example
 * Onnx.tensorType(model.graph.inputs[0]) // { elemType: 7, shape: [{ _tag: "Param", param: "batch" }, ...] }
 *
 * @since 0.1.0
 */
export const tensorType = (v: ValueInfo): { readonly elemType: number; readonly shape?: ReadonlyArray<Dim> } | undefined =>
  v.type?._tag === "Tensor" ? v.type : undefined

/**
 * A graph with nothing in it.
 *
 * @example
 * const g = { ...Onnx.emptyGraph("body"), nodes: [...] }
 *
 * @since 0.1.0
 */
export const emptyGraph = (name = ""): Graph =>
  freeze({
    name,
    nodes: freeze([]),
    initializers: freeze([]),
    sparseInitializers: freeze([]),
    inputs: freeze([]),
    outputs: freeze([]),
    valueInfos: freeze([]),
    docString: "",
    quantizationAnnotations: freeze([]),
    metadataProps: freeze([])
  })

/**
 * The number of elements of a shape (1 for a scalar).
 *
 * @example
 * Onnx.elementCount([2, 3]) // 6
 *
 * @since 0.1.0
 */
export const elementCount = (dims: ReadonlyArray<number>): number => dims.reduce((a, b) => a * b, 1)

const littleEndian = new Uint8Array(Uint16Array.of(1).buffer)[0] === 1

// raw_data is little-endian; on big-endian hosts reverse each element in place.
const swapBytes = (bytes: Uint8Array, size: number): void => {
  if (littleEndian || size === 1) return
  for (let p = 0; p < bytes.length; p += size) bytes.subarray(p, p + size).reverse()
}

type Ctor = { new (n: number): DType.TypedData }

const ctorOf = (dtype: DType.DType): Ctor => DType.arrayFor(dtype, 0).constructor as Ctor

/**
 * A tensor's elements as the typed array of its dtype (see `DType`), read
 * from `rawData` or from the typed field in use. Always a fresh array.
 * Throws {@link OnnxError} for data types without a `DType` (bfloat16,
 * complex, float8, ...), for external data, and for data whose length does
 * not match the dims.
 *
 * @example
 * Onnx.tensorData(Onnx.makeTensor("ids", "int64", [3], BigInt64Array.of(1n, 2n, 3n))) // BigInt64Array [1n, 2n, 3n]
 *
 * @since 0.1.0
 */
export const tensorData = (t: TensorProto): DType.TypedData => {
  const dtype = DType.fromOnnx(t.dataType)
  const fail = (why: string) => new OnnxError({ message: `tensor "${t.name}": ${why}` })
  if (dtype === undefined) throw fail(`data type ${t.dataType} has no typed array`)
  if (t.dataLocation === "EXTERNAL") throw fail("its data is external; load it first")
  const n = elementCount(t.dims)
  if (dtype === "string") {
    if (t.stringData.length !== n) throw fail(`${t.stringData.length} strings for ${n} elements`)
    return t.stringData.map(utf8)
  }
  const size = DType.byteSize(dtype)
  if (t.rawData !== undefined) {
    if (t.rawData.byteLength !== n * size) throw fail(`${t.rawData.byteLength} bytes of raw data for ${n} elements`)
    // Copy into fresh, aligned memory: raw_data views sit at any offset.
    const out = DType.arrayFor(dtype, n) as Exclude<DType.TypedData, Array<string>>
    const bytes = new Uint8Array(out.buffer)
    bytes.set(t.rawData)
    swapBytes(bytes, size)
    return out
  }
  const source: ReadonlyArray<number> | ReadonlyArray<bigint> =
    dtype === "float32"
      ? t.floatData
      : dtype === "float64"
      ? t.doubleData
      : dtype === "int64"
      ? t.int64Data
      : dtype === "uint32" || dtype === "uint64"
      ? t.uint64Data
      : t.int32Data
  if (source.length !== n) throw fail(`${source.length} values for ${n} elements`)
  if (dtype === "int64" || dtype === "uint64") {
    const out = DType.arrayFor(dtype, n)
    for (let k = 0; k < n; k++) out[k] = source[k] as bigint
    return out
  }
  const out = DType.arrayFor(dtype, n)
  for (let k = 0; k < n; k++) out[k] = Number(source[k])
  return out
}

/**
 * The data a tensor may be made from: the typed array of its dtype, or a
 * plain array (numbers, bigints for int64/uint64, booleans for bool, strings
 * for string). float16 takes raw 16-bit words in a `Uint16Array`.
 *
 * @example
 * const d: Onnx.TensorDataLike = [1, 2, 3]
 *
 * @since 0.1.0
 */
export type TensorDataLike =
  | DType.TypedData
  | ReadonlyArray<number>
  | ReadonlyArray<bigint>
  | ReadonlyArray<boolean>
  | ReadonlyArray<string>

/**
 * A tensor of a dtype and dims holding `data`, stored in `raw_data` (string
 * tensors in `string_data`). Typed-array data is copied once.
 *
 * @example
 * Onnx.makeTensor("w", "float32", [2, 3], new Float32Array(6))
 * Onnx.makeTensor("axes", "int64", [1], [0n])
 *
 * @since 0.1.0
 */
export const makeTensor = (
  name: string,
  dtype: DType.DType,
  dims: ReadonlyArray<number>,
  data: TensorDataLike
): TensorProto => {
  const n = elementCount(dims)
  const fail = (why: string) => new OnnxError({ message: `tensor "${name}": ${why}` })
  if (data.length !== n) throw fail(`${data.length} values for shape [${dims.join(", ")}]`)
  const base = {
    name,
    dataType: DType.toOnnx(dtype),
    dims: freeze([...dims]),
    floatData: freeze([]),
    int32Data: freeze([]),
    int64Data: freeze([]),
    docString: "",
    externalData: freeze([]),
    dataLocation: "DEFAULT" as const,
    doubleData: freeze([]),
    uint64Data: freeze([]),
    metadataProps: freeze([])
  }
  if (dtype === "string") {
    if (!Array.isArray(data) || data.some((s) => typeof s !== "string")) throw fail("string tensors take strings")
    return freeze({ ...base, stringData: freeze((data as ReadonlyArray<string>).map(utf8Bytes)) })
  }
  const ctor = ctorOf(dtype)
  let typed: Exclude<DType.TypedData, Array<string>>
  if (data instanceof ctor) {
    typed = data as Exclude<DType.TypedData, Array<string>>
  } else if (ArrayBuffer.isView(data)) {
    throw fail(`${dtype} data must be a ${ctor.name}, got a ${data.constructor.name}`)
  } else {
    if (dtype === "float16") throw fail("float16 data must be a Uint16Array of half-precision bits")
    const out = DType.arrayFor(dtype, n) as Exclude<DType.TypedData, Array<string>>
    const big = DType.isBig(dtype)
    const values = data as ReadonlyArray<number | bigint | boolean | string>
    for (let k = 0; k < n; k++) {
      const v = values[k]
      if (typeof v === "string") throw fail("only string tensors take strings")
      out[k] = (big ? BigInt(v) : Number(v)) as never
    }
    typed = out
  }
  const rawData = new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength).slice()
  swapBytes(rawData, DType.byteSize(dtype))
  return freeze({ ...base, stringData: freeze([]), rawData })
}

// ---------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------

const attributeBase = (name: string, type: AttributeType) => ({
  name,
  refAttrName: "",
  docString: "",
  type,
  floats: freeze([]),
  ints: freeze([]),
  strings: freeze([]),
  tensors: freeze([]),
  graphs: freeze([]),
  sparseTensors: freeze([]),
  typeProtos: freeze([])
})

/**
 * A float attribute (stored as float32).
 *
 * @example
 * Onnx.floatAttribute("epsilon", 1e-5)
 *
 * @since 0.1.0
 */
export const floatAttribute = (name: string, value: number): Attribute =>
  freeze({ ...attributeBase(name, "FLOAT"), f: Math.fround(value) })

/**
 * An int attribute (int64).
 *
 * @example
 * Onnx.intAttribute("axis", -1n)
 *
 * @since 0.1.0
 */
export const intAttribute = (name: string, value: bigint | number): Attribute =>
  freeze({ ...attributeBase(name, "INT"), i: BigInt.asIntN(64, BigInt(value)) })

/**
 * A string attribute (UTF-8 bytes).
 *
 * @example
 * Onnx.stringAttribute("mode", "constant")
 *
 * @since 0.1.0
 */
export const stringAttribute = (name: string, value: string | Uint8Array): Attribute =>
  freeze({ ...attributeBase(name, "STRING"), s: typeof value === "string" ? utf8Bytes(value) : value })

/**
 * A tensor attribute.
 *
 * @example
 * Onnx.tensorAttribute("value", Onnx.makeTensor("", "int64", [1], [3n]))
 *
 * @since 0.1.0
 */
export const tensorAttribute = (name: string, value: TensorProto): Attribute =>
  freeze({ ...attributeBase(name, "TENSOR"), t: value })

/**
 * A graph attribute (If branches, Loop and Scan bodies).
 *
 * @example
 * Onnx.graphAttribute("then_branch", thenGraph)
 *
 * @since 0.1.0
 */
export const graphAttribute = (name: string, value: Graph): Attribute =>
  freeze({ ...attributeBase(name, "GRAPH"), g: value })

/**
 * A sparse tensor attribute.
 *
 * @example
 * Onnx.sparseTensorAttribute("sparse_value", sparse)
 *
 * @since 0.1.0
 */
export const sparseTensorAttribute = (name: string, value: SparseTensorProto): Attribute =>
  freeze({ ...attributeBase(name, "SPARSE_TENSOR"), sparseTensor: value })

/**
 * A type attribute.
 *
 * @example
 * Onnx.typeProtoAttribute("type", Onnx.tensorTypeProto(1))
 *
 * @since 0.1.0
 */
export const typeProtoAttribute = (name: string, value: TypeProto): Attribute =>
  freeze({ ...attributeBase(name, "TYPE_PROTO"), tp: value })

/**
 * A list-of-floats attribute (stored as float32).
 *
 * @example
 * Onnx.floatsAttribute("scales", [1, 2])
 *
 * @since 0.1.0
 */
export const floatsAttribute = (name: string, values: ReadonlyArray<number>): Attribute =>
  freeze({ ...attributeBase(name, "FLOATS"), floats: freeze(values.map(Math.fround)) })

/**
 * A list-of-ints attribute.
 *
 * @example
 * Onnx.intsAttribute("perm", [0n, 2n, 1n])
 *
 * @since 0.1.0
 */
export const intsAttribute = (name: string, values: ReadonlyArray<bigint | number>): Attribute =>
  freeze({ ...attributeBase(name, "INTS"), ints: freeze(values.map((v) => BigInt.asIntN(64, BigInt(v)))) })

/**
 * A list-of-strings attribute.
 *
 * @example
 * Onnx.stringsAttribute("directions", ["forward"])
 *
 * @since 0.1.0
 */
export const stringsAttribute = (name: string, values: ReadonlyArray<string | Uint8Array>): Attribute =>
  freeze({
    ...attributeBase(name, "STRINGS"),
    strings: freeze(values.map((v) => (typeof v === "string" ? utf8Bytes(v) : v)))
  })

/**
 * A list-of-tensors attribute.
 *
 * @example
 * Onnx.tensorsAttribute("values", [a, b])
 *
 * @since 0.1.0
 */
export const tensorsAttribute = (name: string, values: ReadonlyArray<TensorProto>): Attribute =>
  freeze({ ...attributeBase(name, "TENSORS"), tensors: freeze([...values]) })

/**
 * A list-of-graphs attribute.
 *
 * @example
 * Onnx.graphsAttribute("branches", [g1, g2])
 *
 * @since 0.1.0
 */
export const graphsAttribute = (name: string, values: ReadonlyArray<Graph>): Attribute =>
  freeze({ ...attributeBase(name, "GRAPHS"), graphs: freeze([...values]) })

/**
 * A list-of-sparse-tensors attribute.
 *
 * @example
 * Onnx.sparseTensorsAttribute("values", [s])
 *
 * @since 0.1.0
 */
export const sparseTensorsAttribute = (name: string, values: ReadonlyArray<SparseTensorProto>): Attribute =>
  freeze({ ...attributeBase(name, "SPARSE_TENSORS"), sparseTensors: freeze([...values]) })

/**
 * A list-of-types attribute.
 *
 * @example
 * Onnx.typeProtosAttribute("types", [Onnx.tensorTypeProto(1)])
 *
 * @since 0.1.0
 */
export const typeProtosAttribute = (name: string, values: ReadonlyArray<TypeProto>): Attribute =>
  freeze({ ...attributeBase(name, "TYPE_PROTOS"), typeProtos: freeze([...values]) })

/**
 * An attribute of a function body node bound to the calling node's
 * attribute `refAttrName`.
 *
 * @example
 * Onnx.refAttribute("alpha", "alpha", "FLOAT")
 *
 * @since 0.1.0
 */
export const refAttribute = (name: string, refAttrName: string, type: AttributeType): Attribute =>
  freeze({ ...attributeBase(name, type), refAttrName })

/**
 * What {@link attribute} infers an attribute from: number (FLOAT), bigint
 * (INT), string or bytes (STRING), TensorProto, Graph, SparseTensorProto,
 * TypeProto, or a non-empty list of one of these. Empty lists need the typed
 * constructors (`intsAttribute(name, [])`).
 *
 * @example
 * const v: Onnx.AttributeValue = [0n, 2n, 1n]
 *
 * @since 0.1.0
 */
export type AttributeValue =
  | number
  | bigint
  | string
  | Uint8Array
  | TensorProto
  | Graph
  | SparseTensorProto
  | TypeProto
  | ReadonlyArray<number>
  | ReadonlyArray<bigint>
  | ReadonlyArray<string | Uint8Array>
  | ReadonlyArray<TensorProto>
  | ReadonlyArray<Graph>
  | ReadonlyArray<SparseTensorProto>
  | ReadonlyArray<TypeProto>

type Single = Exclude<AttributeValue, ReadonlyArray<unknown>>

const kindOf = (v: Single): "FLOAT" | "INT" | "STRING" | "TENSOR" | "GRAPH" | "SPARSE_TENSOR" | "TYPE_PROTO" => {
  if (typeof v === "number") return "FLOAT"
  if (typeof v === "bigint") return "INT"
  if (typeof v === "string" || v instanceof Uint8Array) return "STRING"
  if ("_tag" in v) return "TYPE_PROTO"
  if ("dataType" in v) return "TENSOR"
  if ("nodes" in v) return "GRAPH"
  return "SPARSE_TENSOR"
}

/**
 * An attribute, its type inferred from the value (see {@link AttributeValue}).
 *
 * @example
 * Onnx.attribute("axis", 1n).type      // "INT"
 * Onnx.attribute("alpha", 0.5).type    // "FLOAT"
 * Onnx.attribute("perm", [1n, 0n]).type // "INTS"
 *
 * @since 0.1.0
 */
export const attribute = (name: string, value: AttributeValue): Attribute => {
  if (Array.isArray(value)) {
    const list = value as ReadonlyArray<Single>
    if (list.length === 0) {
      throw new OnnxError({ message: `attribute "${name}": an empty list has no type; use a typed constructor` })
    }
    const kind = kindOf(list[0])
    if (!list.every((v) => kindOf(v) === kind)) {
      throw new OnnxError({ message: `attribute "${name}": list mixes value kinds` })
    }
    switch (kind) {
      case "FLOAT":
        return floatsAttribute(name, list as ReadonlyArray<number>)
      case "INT":
        return intsAttribute(name, list as ReadonlyArray<bigint>)
      case "STRING":
        return stringsAttribute(name, list as ReadonlyArray<string | Uint8Array>)
      case "TENSOR":
        return tensorsAttribute(name, list as ReadonlyArray<TensorProto>)
      case "GRAPH":
        return graphsAttribute(name, list as ReadonlyArray<Graph>)
      case "SPARSE_TENSOR":
        return sparseTensorsAttribute(name, list as ReadonlyArray<SparseTensorProto>)
      case "TYPE_PROTO":
        return typeProtosAttribute(name, list as ReadonlyArray<TypeProto>)
    }
  }
  const v = value as Single
  switch (kindOf(v)) {
    case "FLOAT":
      return floatAttribute(name, v as number)
    case "INT":
      return intAttribute(name, v as bigint)
    case "STRING":
      return stringAttribute(name, v as string | Uint8Array)
    case "TENSOR":
      return tensorAttribute(name, v as TensorProto)
    case "GRAPH":
      return graphAttribute(name, v as Graph)
    case "SPARSE_TENSOR":
      return sparseTensorAttribute(name, v as SparseTensorProto)
    case "TYPE_PROTO":
      return typeProtoAttribute(name, v as TypeProto)
  }
}

/**
 * Anything carrying attributes: a {@link Node}.
 *
 * @example
 * const holder: Onnx.HasAttributes = model.graph.nodes[0]
 *
 * @since 0.1.0
 */
export interface HasAttributes {
  readonly attributes: ReadonlyArray<Attribute>
}

/**
 * A node's attribute by name.
 *
 * @example
 * Onnx.getAttribute(node, "axis")?.type // "INT"
 *
 * @since 0.1.0
 */
export const getAttribute = (node: HasAttributes, name: string): Attribute | undefined =>
  node.attributes.find((a) => a.name === name)

/**
 * An int attribute's value.
 *
 * @example
 * Onnx.attrInt(castNode, "to") // 1n
 *
 * @since 0.1.0
 */
export const attrInt = (node: HasAttributes, name: string): bigint | undefined => getAttribute(node, name)?.i

/**
 * A list-of-ints attribute's values.
 *
 * @example
 * Onnx.attrInts(transposeNode, "perm") // [0n, 2n, 1n, 3n]
 *
 * @since 0.1.0
 */
export const attrInts = (node: HasAttributes, name: string): ReadonlyArray<bigint> | undefined =>
  getAttribute(node, name)?.ints

/**
 * A float attribute's value.
 *
 * @example
 * Onnx.attrFloat(node, "epsilon") // 0.000009999999747378752
 *
 * @since 0.1.0
 */
export const attrFloat = (node: HasAttributes, name: string): number | undefined => getAttribute(node, name)?.f

/**
 * A list-of-floats attribute's values.
 *
 * @example
 * Onnx.attrFloats(node, "scales") // [1, 2]
 *
 * @since 0.1.0
 */
export const attrFloats = (node: HasAttributes, name: string): ReadonlyArray<number> | undefined =>
  getAttribute(node, name)?.floats

/**
 * A string attribute's value, read as UTF-8.
 *
 * @example
 * Onnx.attrString(padNode, "mode") // "constant"
 *
 * @since 0.1.0
 */
export const attrString = (node: HasAttributes, name: string): string | undefined => {
  const s = getAttribute(node, name)?.s
  return s === undefined ? undefined : utf8(s)
}

/**
 * A list-of-strings attribute's values, read as UTF-8.
 *
 * @example
 * Onnx.attrStrings(node, "directions") // ["forward"]
 *
 * @since 0.1.0
 */
export const attrStrings = (node: HasAttributes, name: string): ReadonlyArray<string> | undefined =>
  getAttribute(node, name)?.strings.map(utf8)

/**
 * A tensor attribute's value.
 *
 * @example
 * Onnx.attrTensor(constantNode, "value")?.dims // [1]
 *
 * @since 0.1.0
 */
export const attrTensor = (node: HasAttributes, name: string): TensorProto | undefined => getAttribute(node, name)?.t

/**
 * A graph attribute's value.
 *
 * @example
 * Onnx.attrGraph(ifNode, "then_branch")?.nodes.length
 *
 * @since 0.1.0
 */
export const attrGraph = (node: HasAttributes, name: string): Graph | undefined => getAttribute(node, name)?.g

/**
 * A list-of-graphs attribute's values.
 *
 * @example
 * Onnx.attrGraphs(node, "branches")
 *
 * @since 0.1.0
 */
export const attrGraphs = (node: HasAttributes, name: string): ReadonlyArray<Graph> | undefined =>
  getAttribute(node, name)?.graphs

// ---------------------------------------------------------------------------
// Graph queries
// ---------------------------------------------------------------------------

/**
 * The subgraphs a node carries in its attributes (If branches, Loop and
 * Scan bodies), in attribute order.
 *
 * @example
 * Onnx.subgraphs(ifNode).length // 2
 *
 * @since 0.1.0
 */
export const subgraphs = (node: HasAttributes): ReadonlyArray<Graph> =>
  node.attributes.flatMap((a) => (a.g === undefined ? a.graphs : [a.g, ...a.graphs]))

const freeNames = (graph: Graph, into: Set<string>): void => {
  const local = new Set<string>()
  for (const v of graph.inputs) local.add(v.name)
  for (const t of graph.initializers) local.add(t.name)
  for (const s of graph.sparseInitializers) if (s.values) local.add(s.values.name)
  for (const n of graph.nodes) for (const o of n.outputs) local.add(o)
  const use = (name: string) => {
    if (name !== "" && !local.has(name)) into.add(name)
  }
  for (const n of graph.nodes) {
    n.inputs.forEach(use)
    for (const g of subgraphs(n)) {
      const inner = new Set<string>()
      freeNames(g, inner)
      inner.forEach(use)
    }
  }
  graph.outputs.forEach((v) => use(v.name))
}

/**
 * The outer-scope tensors a node's subgraphs read by name (If/Loop/Scan
 * bodies may use any tensor visible where the node is), in first-use order.
 * Empty for nodes without subgraphs.
 *
 * @example
 * Onnx.outerNames(ifNode) // ["x", "w"]
 *
 * @since 0.1.0
 */
export const outerNames = (node: HasAttributes): ReadonlyArray<string> => {
  const out = new Set<string>()
  for (const g of subgraphs(node)) freeNames(g, out)
  return [...out]
}

/**
 * The version of an imported opset (default domain `""`), if imported.
 *
 * @example
 * Onnx.opsetVersion(model) // 14n
 *
 * @since 0.1.0
 */
export const opsetVersion = (model: Pick<Model, "opsetImports">, domain = ""): bigint | undefined => {
  const wanted = domain === "ai.onnx" ? "" : domain
  return model.opsetImports.find((o) => (o.domain === "ai.onnx" ? "" : o.domain) === wanted)?.version
}
