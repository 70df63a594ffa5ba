import { describe, expect, test } from "vitest"
import { existsSync, readdirSync, readFileSync } from "node:fs"
import { isDeepStrictEqual } from "node:util"
import * as ort from "onnxruntime-node"
import protobuf from "protobufjs/light.js"
import * as Onnx from "../src/models/Onnx.js"
import * as OnnxSchema from "../src/models/OnnxSchema.js"

const storiesPath = "models/stories260K/onnx/model.onnx"
const fixtures = readdirSync("test/fixtures", { withFileTypes: true })
  .filter((d) => d.isDirectory())
  .map((d) => `test/fixtures/${d.name}/model.onnx`)
  .filter((path) => existsSync(path))

const sessionOptions: ort.InferenceSession.SessionOptions = { extra: { session: { "intra_op.allow_spinning": "0" } } }

// vitest's deep equality walks typed arrays element by element (seconds for
// a 1.3 MB model); Node's compares their bytes. vitest only for the diff.
const expectSame = (actual: unknown, expected: unknown): void => {
  if (!isDeepStrictEqual(actual, expected)) expect(actual).toStrictEqual(expected)
}

const runModel = async (bytes: Uint8Array, feeds: Record<string, ort.Tensor>) => {
  const session = await ort.InferenceSession.create(bytes, sessionOptions)
  try {
    const out = await session.run(feeds)
    return Object.fromEntries(Object.entries(out).map(([k, t]) => [k, { dims: [...t.dims], data: t.data }]))
  } finally {
    await session.release()
  }
}

describe("stories260K", () => {
  const bytes = readFileSync(storiesPath)
  const model = Onnx.decode(bytes)

  test("decodes the graph with scoped node names", () => {
    expect(model.irVersion).toBe(7n)
    expect(model.opsetImports).toEqual([{ domain: "", version: 14n }])
    expect(model.producerName).toBe("pytorch")
    expect(model.graph.nodes.length).toBe(904)
    const names = model.graph.nodes.map((n) => n.name)
    expect(names).toContain("/model/layers.0/self_attn/q_proj/MatMul")
    expect(names.filter((n) => n.startsWith("/model/layers.4/")).length).toBeGreaterThan(10)
    expect(model.graph.inputs.map((v) => v.name).slice(0, 3)).toEqual(["input_ids", "attention_mask", "position_ids"])
    expect(Onnx.tensorType(model.graph.inputs[0])).toEqual({
      _tag: "Tensor",
      elemType: 7,
      shape: [
        { _tag: "Param", param: "batch_size" },
        { _tag: "Param", param: "sequence_length" }
      ]
    })
    const embed = model.graph.initializers.find((t) => t.name === "model.embed_tokens.weight")!
    expect(embed.dims).toEqual([512, 64])
    expect((Onnx.tensorData(embed) as Float32Array).length).toBe(512 * 64)
  })

  test("decode(encode(decode(b))) equals decode(b), and the bytes are the same", () => {
    const encoded = Onnx.encode(model)
    expectSame(Onnx.decode(encoded), model)
    // PyTorch writes fields in number order, as protobufjs does.
    expect(Buffer.from(encoded).equals(bytes)).toBe(true)
  })

  test("re-encoded bytes give exactly the outputs of the original in onnxruntime", async () => {
    const seq = 5
    const feeds: Record<string, ort.Tensor> = {
      input_ids: new ort.Tensor("int64", BigInt64Array.of(1n, 403n, 407n, 261n, 378n), [1, seq]),
      attention_mask: new ort.Tensor("int64", new BigInt64Array(seq).fill(1n), [1, seq]),
      position_ids: new ort.Tensor("int64", BigInt64Array.from({ length: seq }, (_, k) => BigInt(k)), [1, seq])
    }
    for (let n = 0; n < 5; n++) {
      feeds[`past_key_values.${n}.key`] = new ort.Tensor("float32", new Float32Array(0), [1, 4, 0, 8])
      feeds[`past_key_values.${n}.value`] = new ort.Tensor("float32", new Float32Array(0), [1, 4, 0, 8])
    }
    const original = await runModel(bytes, feeds)
    const reencoded = await runModel(Onnx.encode(model), feeds)
    expect(Object.keys(original)).toContain("logits")
    expect(original.logits.dims).toEqual([1, seq, 512])
    expectSame(reencoded, original)
  })
})

describe("fixtures", () => {
  test.each(fixtures)("%s round-trips losslessly", (path) => {
    const bytes = readFileSync(path)
    const model = Onnx.decode(bytes)
    const encoded = Onnx.encode(model)
    expectSame(Onnx.decode(encoded), model)
    expect(Buffer.from(encoded).equals(bytes)).toBe(true)
  })
})

// A model that sets every field of the schema at least once.
const tensorBase = {
  name: "",
  dataType: 1,
  dims: [],
  floatData: [],
  int32Data: [],
  stringData: [],
  int64Data: [],
  docString: "",
  externalData: [],
  dataLocation: "DEFAULT",
  doubleData: [],
  uint64Data: [],
  metadataProps: []
} satisfies Onnx.TensorProto

const kitchenSink = (): Onnx.Model => {
  const entry = (key: string, value: string): Onnx.StringEntry => ({ key, value })
  const f32 = Onnx.makeTensor("f32", "float32", [2], Float32Array.of(1.5, -2))
  const typed: ReadonlyArray<Onnx.TensorProto> = [
    { ...tensorBase, name: "floats", dims: [2], floatData: [0.5, -1], docString: "float_data" },
    { ...tensorBase, name: "int32s", dataType: 6, dims: [3], int32Data: [-1, 0, 2147483647] },
    { ...tensorBase, name: "strings", dataType: 8, dims: [2], stringData: [Onnx.utf8Bytes("a"), Onnx.utf8Bytes("ü")] },
    { ...tensorBase, name: "int64s", dataType: 7, dims: [2], int64Data: [-(2n ** 63n), 2n ** 63n - 1n] },
    { ...tensorBase, name: "doubles", dataType: 11, dims: [1], doubleData: [Math.PI] },
    { ...tensorBase, name: "uint64s", dataType: 13, dims: [1], uint64Data: [2n ** 64n - 1n] },
    {
      ...tensorBase,
      name: "external",
      dims: [4],
      dataLocation: "EXTERNAL",
      externalData: [entry("location", "weights.bin"), entry("offset", "0")],
      segment: { begin: 0n, end: 4n },
      metadataProps: [entry("origin", "test")]
    }
  ]
  const sparse: Onnx.SparseTensorProto = {
    values: Onnx.makeTensor("sparse", "float32", [1], Float32Array.of(7)),
    indices: Onnx.makeTensor("", "int64", [1], BigInt64Array.of(3n)),
    dims: [10]
  }
  const seqType: Onnx.TypeProto = { _tag: "Sequence", elemType: Onnx.tensorTypeProto(1, [3]), denotation: "LIST" }
  const types: ReadonlyArray<Onnx.TypeProto> = [
    { _tag: "Tensor", elemType: 1, shape: [Onnx.dimValue(2), Onnx.dimParam("n"), { _tag: "Unknown", denotation: "DATA_CHANNEL" }] },
    { _tag: "SparseTensor", elemType: 1, shape: [Onnx.dimValue(10)], denotation: "SPARSE" },
    seqType,
    { _tag: "Map", keyType: 7, valueType: Onnx.tensorTypeProto(1) },
    { _tag: "Optional", elemType: seqType },
    { _tag: "Unset", denotation: "NOTHING" }
  ]
  const valueInfo = (name: string, type: Onnx.TypeProto): Onnx.ValueInfo => ({
    name,
    type,
    docString: `doc of ${name}`,
    metadataProps: [entry("k", name)]
  })
  const body: Onnx.Graph = {
    ...Onnx.emptyGraph("then"),
    nodes: [
      {
        name: "inner",
        opType: "Identity",
        domain: "",
        overload: "",
        inputs: ["x"],
        outputs: ["y"],
        attributes: [],
        docString: "",
        metadataProps: [],
        deviceConfigurations: []
      }
    ],
    outputs: [Onnx.tensorValueInfo("y", 1)]
  }
  const attributes: ReadonlyArray<Onnx.Attribute> = [
    { ...Onnx.floatAttribute("f", 0.25), docString: "a float" },
    Onnx.intAttribute("i", 2n ** 63n - 1n),
    Onnx.stringAttribute("s", "héllo"),
    Onnx.tensorAttribute("t", f32),
    Onnx.graphAttribute("g", body),
    Onnx.sparseTensorAttribute("sparse_tensor", sparse),
    Onnx.typeProtoAttribute("tp", types[3]),
    Onnx.floatsAttribute("floats", [1, -0.5]),
    Onnx.intsAttribute("ints", [-(2n ** 63n), 0n]),
    Onnx.stringsAttribute("strings", ["a", ""]),
    Onnx.tensorsAttribute("tensors", typed.slice(0, 2)),
    Onnx.graphsAttribute("graphs", [body, Onnx.emptyGraph("empty")]),
    Onnx.sparseTensorsAttribute("sparse_tensors", [sparse]),
    Onnx.typeProtosAttribute("type_protos", types),
    Onnx.refAttribute("alpha", "alpha", "FLOAT")
  ]
  const node: Onnx.Node = {
    name: "/everything",
    opType: "Everything",
    domain: "test.sink",
    overload: "v2",
    inputs: ["x", ""],
    outputs: ["z"],
    attributes,
    docString: "all attribute kinds",
    metadataProps: [entry("scope", "/")],
    deviceConfigurations: [
      {
        configurationId: "two",
        pipelineStage: 1,
        shardingSpec: [
          {
            tensorName: "x",
            device: [0n, 1n],
            indexToDeviceGroupMap: [{ key: 0n, value: [0n, 1n] }],
            shardedDim: [
              {
                axis: -1n,
                simpleSharding: [
                  { dim: Onnx.dimValue(64), numShards: 2n },
                  { dim: Onnx.dimParam("n"), numShards: 2n },
                  { dim: Onnx.dimUnknown, numShards: 1n }
                ]
              }
            ]
          }
        ]
      }
    ]
  }
  const graph: Onnx.Graph = {
    name: "sink",
    nodes: [node],
    initializers: [f32, ...typed],
    sparseInitializers: [sparse],
    inputs: [valueInfo("x", types[0])],
    outputs: [valueInfo("z", types[1])],
    valueInfos: types.slice(2).map((t, k) => valueInfo(`v${k}`, t)),
    docString: "graph doc",
    quantizationAnnotations: [{ tensorName: "x", quantParameterTensorNames: [entry("SCALE_TENSOR", "x_scale")] }],
    metadataProps: [entry("graph", "meta")]
  }
  const fn: Onnx.FunctionProto = {
    name: "Everything",
    domain: "test.sink",
    overload: "v2",
    inputs: ["x", "unused"],
    outputs: ["z"],
    attributes: ["beta"],
    attributeProtos: [Onnx.floatAttribute("alpha", 1)],
    nodes: [{ ...body.nodes[0], outputs: ["z"] }],
    docString: "fn doc",
    opsetImports: [{ domain: "", version: 18n }],
    valueInfos: [valueInfo("z", types[0])],
    metadataProps: [entry("fn", "meta")]
  }
  return {
    irVersion: 13n,
    opsetImports: [
      { domain: "", version: 18n },
      { domain: "test.sink", version: 1n }
    ],
    producerName: "nnsight-ts",
    producerVersion: "0.1.0",
    domain: "org.test",
    modelVersion: 3n,
    docString: "a model with every field",
    graph,
    metadataProps: [entry("a", "b")],
    trainingInfo: [
      {
        initialization: body,
        algorithm: Onnx.emptyGraph("algorithm"),
        initializationBinding: [entry("w", "y")],
        updateBinding: [entry("w", "y2")]
      }
    ],
    functions: [fn],
    configurations: [{ name: "two", numDevices: 2, device: ["cuda:0", "cuda:1"] }]
  }
}

describe("schema coverage", () => {
  const root = protobuf.Root.fromJSON(OnnxSchema.descriptor as protobuf.INamespace)
  const allTypes = (ns: protobuf.NamespaceBase): Array<protobuf.Type> =>
    ns.nestedArray.flatMap((n) =>
      n instanceof protobuf.Type ? [n, ...allTypes(n)] : n instanceof protobuf.Namespace ? allTypes(n) : []
    )

  test("the kitchen-sink model writes every field of the schema, and reads back equal", () => {
    const model = kitchenSink()
    const bytes = Onnx.encode(model)
    const ModelProto = root.lookupType("onnx.ModelProto")
    const seen = new Set<string>()
    const walk = (type: protobuf.Type, m: any): void => {
      for (const field of type.fieldsArray) {
        const v = m[field.name]
        const present = field.repeated ? v.length > 0 : Object.prototype.hasOwnProperty.call(m, field.name) && v != null
        if (!present) continue
        seen.add(`${type.fullName}.${field.name}`)
        field.resolve()
        if (field.resolvedType instanceof protobuf.Type) {
          for (const x of field.repeated ? v : [v]) walk(field.resolvedType, x)
        }
      }
    }
    const raw = ModelProto.decode(bytes)
    walk(ModelProto, raw)
    // Our writer and protobufjs' agree byte for byte.
    expect(Buffer.from(ModelProto.encode(raw).finish()).equals(bytes)).toBe(true)
    const all = allTypes(root).flatMap((t) => t.fieldsArray.map((f) => `${t.fullName}.${f.name}`))
    expect(all.length).toBeGreaterThan(120)
    expect(all.filter((f) => !seen.has(f))).toEqual([])
    const decoded = Onnx.decode(bytes)
    expect(decoded).toEqual(model)
    expect(Onnx.decode(Onnx.encode(decoded))).toStrictEqual(decoded)
  })

  test("attribute type codes are the schema's", () => {
    const values = root.lookupEnum("onnx.AttributeProto.AttributeType").values
    expect(values).toEqual(Onnx.attributeTypeCodes)
  })

  test("the schema is the newest IR version", () => {
    expect(OnnxSchema.irVersion).toBe(13n)
  })
})

describe("tensors", () => {
  test("makeTensor then tensorData gives the data back, for every dtype", () => {
    const cases: ReadonlyArray<[Parameters<typeof Onnx.makeTensor>[1], Onnx.TensorDataLike]> = [
      ["float32", Float32Array.of(1.5, -0, Infinity)],
      ["float64", Float64Array.of(Math.PI, -1e300, NaN)],
      ["float16", Uint16Array.of(0x3c00, 0xc000, 0x7c00)],
      ["int8", Int8Array.of(-128, 0, 127)],
      ["int16", Int16Array.of(-32768, 1, 32767)],
      ["int32", Int32Array.of(-(2 ** 31), 0, 2 ** 31 - 1)],
      ["int64", BigInt64Array.of(-(2n ** 63n), 0n, 2n ** 63n - 1n)],
      ["uint8", Uint8Array.of(0, 128, 255)],
      ["uint16", Uint16Array.of(0, 1, 65535)],
      ["uint32", Uint32Array.of(0, 1, 2 ** 32 - 1)],
      ["uint64", BigUint64Array.of(0n, 1n, 2n ** 64n - 1n)],
      ["bool", Uint8Array.of(1, 0, 1)],
      ["string", ["a", "ü", ""]]
    ]
    for (const [dtype, data] of cases) {
      const t = Onnx.makeTensor("t", dtype, [3], data)
      expect(Onnx.tensorData(t)).toEqual(data)
      expect(Onnx.tensorData(Onnx.decode(Onnx.encode(modelWith(t))).graph.initializers[0])).toEqual(data)
    }
  })

  test("makeTensor takes plain arrays, copies typed data once, and checks the length", () => {
    expect(Onnx.tensorData(Onnx.makeTensor("a", "int64", [2], [1n, -2n]))).toEqual(BigInt64Array.of(1n, -2n))
    expect(Onnx.tensorData(Onnx.makeTensor("b", "bool", [2], [true, false]))).toEqual(Uint8Array.of(1, 0))
    expect(Onnx.tensorData(Onnx.makeTensor("c", "float32", [], [2.5]))).toEqual(Float32Array.of(2.5))
    const data = Float32Array.of(1, 2)
    const t = Onnx.makeTensor("d", "float32", [2], data)
    data[0] = 9
    expect(Onnx.tensorData(t)).toEqual(Float32Array.of(1, 2))
    expect(() => Onnx.makeTensor("e", "float32", [3], Float32Array.of(1))).toThrow(Onnx.OnnxError)
    expect(() => Onnx.makeTensor("f", "float32", [1], Int32Array.of(1))).toThrow(/Float32Array/)
  })

  test("tensorData reads the typed fields, aligned or not", () => {
    const base = { ...tensorBase, dims: [2] }
    expect(Onnx.tensorData({ ...base, floatData: [1, 2] })).toEqual(Float32Array.of(1, 2))
    expect(Onnx.tensorData({ ...base, dataType: 10, int32Data: [0x3c00, 0x4000] })).toEqual(Uint16Array.of(0x3c00, 0x4000))
    expect(Onnx.tensorData({ ...base, dataType: 9, int32Data: [1, 0] })).toEqual(Uint8Array.of(1, 0))
    expect(Onnx.tensorData({ ...base, dataType: 7, int64Data: [5n, -5n] })).toEqual(BigInt64Array.of(5n, -5n))
    expect(Onnx.tensorData({ ...base, dataType: 12, uint64Data: [7n, 4294967295n] })).toEqual(Uint32Array.of(7, 4294967295))
    expect(Onnx.tensorData({ ...base, dataType: 11, doubleData: [0.1, 0.2] })).toEqual(Float64Array.of(0.1, 0.2))
    // raw_data at an odd offset, as decoded tensors have
    const raw = new Uint8Array(9).subarray(1)
    new DataView(raw.buffer, raw.byteOffset).setFloat32(4, 3.5, true)
    expect(Onnx.tensorData({ ...base, rawData: raw })).toEqual(Float32Array.of(0, 3.5))
    expect(() => Onnx.tensorData({ ...base, dataType: 16, rawData: new Uint8Array(4) })).toThrow(/bfloat|no typed array/)
    expect(() => Onnx.tensorData({ ...base, dataLocation: "EXTERNAL" })).toThrow(/external/)
    expect(() => Onnx.tensorData({ ...base, floatData: [1] })).toThrow(Onnx.OnnxError)
  })
})

const modelWith = (t: Onnx.TensorProto): Onnx.Model => ({
  irVersion: 8n,
  opsetImports: [{ domain: "", version: 14n }],
  producerName: "",
  producerVersion: "",
  domain: "",
  modelVersion: 0n,
  docString: "",
  graph: { ...Onnx.emptyGraph("g"), initializers: [t] },
  metadataProps: [],
  trainingInfo: [],
  functions: [],
  configurations: []
})

describe("attributes", () => {
  const node = {
    attributes: [
      Onnx.attribute("axis", -1n),
      Onnx.attribute("ends", [2n ** 63n - 1n]),
      Onnx.attribute("alpha", 0.1),
      Onnx.attribute("scales", [1, 2.5]),
      Onnx.attribute("mode", "constant"),
      Onnx.attribute("names", ["a", "b"]),
      Onnx.attribute("value", Onnx.makeTensor("", "int64", [1], [3n])),
      Onnx.attribute("then_branch", Onnx.emptyGraph("then")),
      Onnx.attribute("branches", [Onnx.emptyGraph("a"), Onnx.emptyGraph("b")]),
      Onnx.attribute("type", Onnx.tensorTypeProto(1))
    ]
  }

  test("inferred from values, read back by the getters", () => {
    expect(node.attributes.map((a) => a.type)).toEqual([
      "INT",
      "INTS",
      "FLOAT",
      "FLOATS",
      "STRING",
      "STRINGS",
      "TENSOR",
      "GRAPH",
      "GRAPHS",
      "TYPE_PROTO"
    ])
    expect(Onnx.attrInt(node, "axis")).toBe(-1n)
    expect(Onnx.attrInts(node, "ends")).toEqual([9223372036854775807n])
    expect(Onnx.attrFloat(node, "alpha")).toBe(Math.fround(0.1))
    expect(Onnx.attrFloats(node, "scales")).toEqual([1, 2.5])
    expect(Onnx.attrString(node, "mode")).toBe("constant")
    expect(Onnx.attrStrings(node, "names")).toEqual(["a", "b"])
    expect(Onnx.attrTensor(node, "value")?.dims).toEqual([1])
    expect(Onnx.attrGraph(node, "then_branch")?.name).toBe("then")
    expect(Onnx.attrGraphs(node, "branches")?.map((g) => g.name)).toEqual(["a", "b"])
    expect(Onnx.attrInt(node, "missing")).toBeUndefined()
    expect(Onnx.attrInts(node, "missing")).toBeUndefined()
    expect(() => Onnx.attribute("empty", [])).toThrow(/typed constructor/)
    expect(Onnx.intsAttribute("empty", []).type).toBe("INTS")
  })

  test("a present zero is written (onnxruntime checks presence)", () => {
    const zero = Onnx.intAttribute("axis", 0n)
    const g: Onnx.Graph = {
      ...Onnx.emptyGraph(),
      nodes: [
        {
          name: "n",
          opType: "X",
          domain: "",
          overload: "",
          inputs: [],
          outputs: [],
          attributes: [zero, Onnx.floatAttribute("f", 0)],
          docString: "",
          metadataProps: [],
          deviceConfigurations: []
        }
      ]
    }
    const back = Onnx.decode(Onnx.encode({ ...modelWith(Onnx.makeTensor("t", "int8", [0], [])), graph: g }))
    expect(back.graph.nodes[0].attributes[0].i).toBe(0n)
    expect(back.graph.nodes[0].attributes[1].f).toBe(0)
  })
})

describe("graph queries", () => {
  test("outerNames finds outer tensors read inside subgraphs, at any depth", () => {
    const identity = (input: string, output: string): Onnx.Node => ({
      name: output,
      opType: "Identity",
      domain: "",
      overload: "",
      inputs: [input],
      outputs: [output],
      attributes: [],
      docString: "",
      metadataProps: [],
      deviceConfigurations: []
    })
    const inner: Onnx.Graph = { ...Onnx.emptyGraph("inner"), nodes: [identity("w", "a"), identity("local", "b")] }
    const outer: Onnx.Graph = {
      ...Onnx.emptyGraph("outer"),
      inputs: [Onnx.tensorValueInfo("local", 1)],
      nodes: [{ ...identity("x", "local2"), attributes: [Onnx.graphAttribute("body", inner)] }, identity("local2", "out")],
      outputs: [Onnx.tensorValueInfo("out", 1)]
    }
    const ifNode = { attributes: [Onnx.graphAttribute("then_branch", outer), Onnx.intAttribute("k", 1n)] }
    expect(Onnx.outerNames(ifNode)).toEqual(["x", "w"])
    expect(Onnx.outerNames({ attributes: [] })).toEqual([])
    expect(Onnx.subgraphs(ifNode)).toEqual([outer])
  })

  test("opsetVersion treats ai.onnx as the default domain", () => {
    const m = { opsetImports: [{ domain: "ai.onnx", version: 13n }, { domain: "com.microsoft", version: 1n }] }
    expect(Onnx.opsetVersion(m)).toBe(13n)
    expect(Onnx.opsetVersion(m, "com.microsoft")).toBe(1n)
    expect(Onnx.opsetVersion(m, "x")).toBeUndefined()
  })

  test("decode rejects bytes that are not a model", () => {
    expect(() => Onnx.decode(Uint8Array.of(0x0a, 0xff, 0xff))).toThrow(Onnx.OnnxError)
  })
})
