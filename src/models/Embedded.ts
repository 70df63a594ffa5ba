/**
 * Where the embedded default model lives: `models/stories260K` in the
 * package (it ships with it).
 *
 * @example
 * import { defaultModelDir } from "nnsight-ts"
 * const model = await LanguageModel.load(defaultModelDir)
 *
 * @since 0.1.0
 */
import * as path from "node:path"
import { fileURLToPath } from "node:url"

// src/models/Embedded.ts or dist/models/Embedded.js: the package root is three levels up
const packageRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..")

/**
 * The folder of stories260K.
 *
 * @since 0.1.0
 */
export const defaultModelDir: string = path.join(packageRoot, "models", "stories260K")
