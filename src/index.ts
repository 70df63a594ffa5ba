/**
 * nnsight-ts: read, save, patch, steer and differentiate the internals of
 * ONNX models while they run, on onnxruntime.
 *
 * @example
 * import { LanguageModel } from "nnsight-ts"
 * const model = await LanguageModel.load("models/stories260K")
 * const { hidden } = await model.trace("Once upon a time", (m) => ({ hidden: m.model.layers[1].output }))
 *
 * @since 0.1.0
 */
export { NNsight, TracedModel } from "./models/NNsight.js"
export type { Inputs, LoadOptions, TraceOptions, Batch } from "./models/NNsight.js"
export { LanguageModel } from "./models/LanguageModel.js"
export type { Prompt, Tokenizer } from "./models/LanguageModel.js"
export { Tensor, InvalidTensor } from "./core/Tensor.js"
export type { Envoy, EnvoyMembers, Saved, Context as TraceContext, Operand } from "./core/Tracer.js"
export { DictProxy, GradProxy, HookProxy, ListProxy, TensorProxy, VariableProxy } from "./core/Tracer.js"
export { Backend } from "./backends/Backend.js"

export * as DType from "./core/DType.js"
export * as Index from "./core/Index.js"
export * as Graph from "./core/Graph.js"
export * as Ops from "./core/Ops.js"
export * as Errors from "./core/Errors.js"
export * as Picture from "./core/Picture.js"
export * as Onnx from "./models/Onnx.js"
export * as OnnxBuilder from "./models/OnnxBuilder.js"
export * as ModuleTree from "./models/ModuleTree.js"
export * as Segments from "./models/Segments.js"
export * as Loaded from "./models/Loaded.js"
export * as Sessions from "./backends/Sessions.js"
export * as Local from "./backends/Local.js"
export * as Hub from "./models/Hub.js"
export * as Generate from "./backends/Generate.js"
export * as Remote from "./remote/Client.js"

/**
 * The embedded default model's folder (stories260K, a tiny trained Llama).
 *
 * @example
 * const model = await LanguageModel.load(defaultModelDir)
 *
 * @since 0.1.0
 */
export { defaultModelDir } from "./models/Embedded.js"
