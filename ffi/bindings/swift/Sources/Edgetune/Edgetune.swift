// A thin Swift binding over the C API of ffi/include/edgetune.h: handles become classes that
// free themselves in deinit, result codes other than ET_OK become thrown EdgetuneErrors with
// et_error_text's message. Like the C handles, a Model and the Trainers and FedClients made
// on it are used from one thread at a time; the library shares the model with them, so
// they may outlive it.
import CEdgetune
import Foundation

public struct EdgetuneError: Error, CustomStringConvertible {
    public let code: UInt32
    public let message: String
    public var description: String { "edgetune error \(code): \(message)" }
}

func check(_ r: et_result) throws {
    if r == ET_OK { return }
    var buf = [CChar](repeating: 0, count: 2048)
    var n = 0
    _ = et_error_text(r.rawValue, &buf, buf.count, &n)
    throw EdgetuneError(code: r.rawValue, message: String(cString: buf))
}

public enum Edgetune {
    /// The library's version (et_version).
    public static var version: String { String(cString: et_version()) }

    /// The x-edgetune-signature of an upload body under the client's key (et_fed_sign).
    public static func sign(key: [UInt8], nonce: UInt64, body: [UInt8]) throws -> String {
        var out = [CChar](repeating: 0, count: 65)
        try check(et_fed_sign(key, key.count, nonce, body, body.count, &out))
        return String(cString: out)
    }
}

/// A backend (et_runtime): ET_BACKEND_AUTO, _CPU, _HOST or _GPU.
public final class Runtime {
    var handle: OpaquePointer?

    public init(backend: UInt32 = UInt32(ET_BACKEND_AUTO), threads: UInt32 = 0) throws {
        var opts = et_runtime_options(backend: backend, threads: threads, gpu_name: nil)
        try check(et_runtime_new(&opts, &handle))
    }

    deinit { et_runtime_free(&handle) }
}

/// Token ids, each predicting every token after its first, laid out for et_example (one
/// flat buffer of tokens and one of flags).
public struct Examples {
    let tokens: [UInt32]
    let flags: [UInt8]
    let lengths: [Int]

    public init(_ sequences: [[UInt32]]) {
        tokens = sequences.flatMap { $0 }
        flags = sequences.flatMap { s in s.indices.map { $0 == 0 ? UInt8(0) : UInt8(1) } }
        lengths = sequences.map { $0.count }
    }

    /// Calls `body` with et_example values pointing into this struct's buffers.
    func withExamples<R>(_ body: ([et_example]) throws -> R) rethrows -> R {
        try tokens.withUnsafeBufferPointer { t in
            try flags.withUnsafeBufferPointer { f in
                var out: [et_example] = []
                var at = 0
                for n in lengths {
                    out.append(et_example(tokens: t.baseAddress.map { $0 + at }, targets: f.baseAddress.map { $0 + at }, len: n))
                    at += n
                }
                return try body(out)
            }
        }
    }
}

/// A model and its tokenizer (et_model).
public final class Model {
    var handle: OpaquePointer?

    public init(runtime: Runtime, path: String) throws {
        try check(et_model_load_file(runtime.handle, path, &handle))
    }

    public init(runtime: Runtime, bytes: [UInt8]) throws {
        try check(et_model_load_bytes(runtime.handle, bytes, bytes.count, &handle))
    }

    deinit { et_model_free(&handle) }

    public func vocabSize() throws -> UInt32 {
        var n: UInt32 = 0
        try check(et_vocab_size(handle, &n))
        return n
    }

    public func tokenize(_ text: String) throws -> [UInt32] {
        let bytes = Array(text.utf8)
        var n = 0
        try bytes.withUnsafeBufferPointer { b in
            try b.withMemoryRebound(to: CChar.self) { c in
                try check(et_tokenize(handle, c.baseAddress, c.count, nil, 0, &n))
            }
        }
        var ids = [UInt32](repeating: 0, count: n)
        try bytes.withUnsafeBufferPointer { b in
            try b.withMemoryRebound(to: CChar.self) { c in
                try check(et_tokenize(handle, c.baseAddress, c.count, &ids, ids.count, &n))
            }
        }
        return ids
    }

    public func detokenize(_ ids: [UInt32]) throws -> String {
        var n = 0
        try check(et_detokenize(handle, ids, ids.count, nil, 0, &n))
        var buf = [CChar](repeating: 0, count: n + 1)
        try check(et_detokenize(handle, ids, ids.count, &buf, buf.count, &n))
        return String(cString: buf)
    }

    /// Logits of every position: ids.count rows of vocabSize() values.
    public func logits(_ ids: [UInt32]) throws -> [Float] {
        var n = 0
        try check(et_logits(handle, ids, ids.count, nil, 0, &n))
        var out = [Float](repeating: 0, count: n)
        try check(et_logits(handle, ids, ids.count, &out, out.count, &n))
        return out
    }

    /// Greedy continuation of up to maxTokens; each whole UTF-8 piece goes to onPiece.
    public func generate(_ prompt: String, maxTokens: UInt32, onPiece: @escaping (String) -> Void)
        throws -> Int
    {
        final class Box { let f: (String) -> Void; init(_ f: @escaping (String) -> Void) { self.f = f } }
        let box = Unmanaged.passRetained(Box(onPiece))
        defer { box.release() }
        var opts = et_generate_options()
        opts.max_tokens = maxTokens
        opts.top_p = 1
        opts.repetition_penalty = 1
        let bytes = Array(prompt.utf8)
        var tokens = 0
        let cb: et_token_callback = { user, piece, len, _ in
            let box = Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue()
            let data = Data(bytes: piece!, count: len)
            box.f(String(decoding: data, as: UTF8.self))
            return 0
        }
        try bytes.withUnsafeBufferPointer { b in
            try b.withMemoryRebound(to: CChar.self) { c in
                try check(et_generate(handle, c.baseAddress, c.count, &opts, cb, box.toOpaque(), nil, &tokens))
            }
        }
        return tokens
    }

    /// Attaches LoRA (ET_TARGET_* bits; 0 for q and v).
    public func attachLora(rank: UInt32, alpha: Float, targets: UInt32 = 0, seed: UInt64 = 0) throws {
        var o = et_lora_options(rank: rank, alpha: alpha, targets: targets, seed: seed)
        try check(et_adapter_lora(handle, &o))
    }

    public func attachIa3() throws { try check(et_adapter_ia3(handle)) }
    /// The quantised projections' block scales (ET_TARGET_* bits; 0 for all) as the trainable set.
    public func attachScales(targets: UInt32 = 0) throws { try check(et_adapter_scales(handle, targets)) }
    public func attachNorms() throws { try check(et_adapter_norms(handle)) }
    public func saveAdapter(dir: String) throws { try check(et_adapter_save(handle, dir)) }
    public func loadAdapter(dir: String) throws { try check(et_adapter_load(handle, dir)) }
}

/// A training session on a model's attached adapter (et_trainer).
public final class Trainer {
    var handle: OpaquePointer?

    public init(model: Model, zerothOrder opts: et_zo_options) throws {
        var o = opts
        try check(et_trainer_zo_new(model.handle, &o, &handle))
    }

    public init(model: Model, backprop opts: et_backprop_options) throws {
        var o = opts
        try check(et_trainer_backprop_new(model.handle, &o, &handle))
    }

    deinit { et_trainer_free(&handle) }

    /// Runs `steps` steps; returns their mean loss.
    public func train(_ examples: Examples, steps: UInt32) throws -> Float {
        var loss: Float = 0
        try examples.withExamples { ex in
            try check(et_trainer_train(handle, ex, ex.count, steps, nil, nil, nil, &loss))
        }
        return loss
    }

    public func eval(_ examples: Examples) throws -> Float {
        var loss: Float = 0
        try examples.withExamples { ex in try check(et_trainer_eval(handle, ex, ex.count, &loss)) }
        return loss
    }

    public func save(dir: String) throws { try check(et_trainer_save(handle, dir)) }
    public func resume(dir: String) throws { try check(et_trainer_resume(handle, dir)) }

    public func stateHash() throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        try check(et_trainer_state_hash(handle, &out))
        return out
    }
}

/// A federated client (et_fed_client): the app's URLSession carries the bytes.
public final class FedClient {
    var handle: OpaquePointer?

    public init(model: Model, session: [UInt8], clientId: UInt32, dir: String, maxTokens: UInt32) throws {
        try check(et_fed_client_new(model.handle, session, session.count, clientId, dir, maxTokens, &handle))
    }

    deinit { et_fed_client_free(&handle) }

    /// The next round's upload message, after its local steps.
    public func trainRound(_ examples: Examples, batch: UInt32) throws -> [UInt8] {
        var p: UnsafeMutablePointer<UInt8>?
        var len = 0
        try examples.withExamples { ex in
            try check(et_fed_client_train_round(handle, ex, ex.count, batch, &p, &len, nil, nil))
        }
        defer { et_bytes_free(p, len) }
        return Array(UnsafeBufferPointer(start: p, count: len))
    }

    public func markUploaded(round: UInt32) throws { try check(et_fed_client_mark_uploaded(handle, round)) }

    /// true if applied now, false if applied before.
    public func applyRound(_ msg: [UInt8]) throws -> Bool {
        var round: UInt32 = 0
        var applied: UInt8 = 0
        try check(et_fed_client_apply_round(handle, msg, msg.count, &round, &applied))
        return applied != 0
    }

    public func restoreCheckpoint(_ cp: [UInt8]) throws {
        try check(et_fed_client_restore_checkpoint(handle, cp, cp.count))
    }

    public func stateHash() throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        try check(et_fed_client_state_hash(handle, &out))
        return out
    }
}
