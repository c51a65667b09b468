package dev.edgetune;

import com.sun.jna.Callback;
import com.sun.jna.Library;
import com.sun.jna.Memory;
import com.sun.jna.Native;
import com.sun.jna.Pointer;
import com.sun.jna.Structure;
import com.sun.jna.ptr.ByteByReference;
import com.sun.jna.ptr.FloatByReference;
import com.sun.jna.ptr.IntByReference;
import com.sun.jna.ptr.LongByReference;
import com.sun.jna.ptr.PointerByReference;
import java.nio.charset.StandardCharsets;
import java.util.function.Consumer;

/**
 * A thin Java binding over libedgetune_ffi, the C API of ffi/include/edgetune.h, through JNA
 * (Android apps: JNA's AAR, or the same calls through JNI). Result codes other than ET_OK
 * become {@link EdgetuneException}s carrying the code and et_error_text's message; handles
 * are closed with close() (try-with-resources). size_t is mapped to long: 64-bit platforms.
 * Like the C handles, a Runtime or Model is used from one thread at a time.
 */
public final class Edgetune {
    private Edgetune() {}

    /** The C functions, as the header declares them. */
    interface Lib extends Library {
        Lib C = Native.load("edgetune_ffi", Lib.class);

        String et_version();

        int et_error_text(int code, byte[] buf, long len, LongByReference outLen);

        int et_runtime_new(RuntimeOptions opts, PointerByReference out);

        void et_runtime_free(PointerByReference rt);

        int et_model_load_file(Pointer rt, String path, PointerByReference out);

        void et_model_free(PointerByReference model);

        int et_vocab_size(Pointer model, IntByReference out);

        int et_tokenize(Pointer model, byte[] text, long len, int[] ids, long cap, LongByReference outN);

        int et_detokenize(Pointer model, int[] ids, long n, byte[] buf, long cap, LongByReference outLen);

        int et_generate(Pointer model, byte[] prompt, long len, GenerateOptions opts, TokenCallback callback,
                Pointer user, Pointer cancel, LongByReference outTokens);

        int et_logits(Pointer model, int[] ids, long n, float[] out, long cap, LongByReference outN);

        int et_adapter_lora(Pointer model, LoraOptions opts);

        int et_adapter_scales(Pointer model, int targets);

        int et_adapter_norms(Pointer model);

        int et_adapter_save(Pointer model, String dir);

        int et_adapter_load(Pointer model, String dir);

        int et_trainer_zo_new(Pointer model, ZoOptions opts, PointerByReference out);

        int et_trainer_backprop_new(Pointer model, BackpropOptions opts, PointerByReference out);

        void et_trainer_free(PointerByReference t);

        int et_trainer_train(Pointer t, Example[] examples, long n, int steps, ProgressCallback callback,
                Pointer user, Pointer cancel, FloatByReference outLoss);

        int et_trainer_eval(Pointer t, Example[] examples, long n, FloatByReference outLoss);

        int et_trainer_save(Pointer t, String dir);

        int et_trainer_resume(Pointer t, String dir);

        int et_trainer_state_hash(Pointer t, byte[] out);

        int et_fed_client_new(Pointer model, byte[] session, long len, int clientId, String dir,
                int maxTokens, PointerByReference out);

        void et_fed_client_free(PointerByReference c);

        int et_fed_client_train_round(Pointer c, Example[] examples, long n, int batch,
                PointerByReference outUpload, LongByReference outLen, IntByReference outRound,
                FloatByReference outLoss);

        int et_fed_client_mark_uploaded(Pointer c, int round);

        int et_fed_client_apply_round(Pointer c, byte[] round, long len, IntByReference outRound,
                ByteByReference outApplied);

        int et_fed_client_restore_checkpoint(Pointer c, byte[] checkpoint, long len);

        int et_fed_client_rounds(Pointer c, IntByReference outApplied, IntByReference outUploaded);

        int et_fed_client_state_hash(Pointer c, byte[] out);

        int et_fed_sign(byte[] key, long keyLen, long nonce, byte[] body, long bodyLen, byte[] out);

        void et_bytes_free(Pointer p, long len);
    }

    /** et_lora_options. */
    @Structure.FieldOrder({"rank", "alpha", "targets", "seed"})
    public static class LoraOptions extends Structure {
        public int rank;
        public float alpha;
        public int targets;
        public long seed;
    }

    /** et_example. */
    @Structure.FieldOrder({"tokens", "targets", "len"})
    public static class Example extends Structure {
        public Pointer tokens;
        public Pointer targets;
        public long len;
    }

    /** et_zo_options. */
    @Structure.FieldOrder({"batch", "lr", "eps", "seeds", "delta_exp", "clip", "seed", "max_tokens"})
    public static class ZoOptions extends Structure {
        public int batch = 1;
        public float lr = 1e-3f;
        public float eps = 1e-2f;
        public int seeds;
        public int delta_exp;
        public float clip;
        public long seed;
        public int max_tokens = 128;
    }

    /** et_backprop_options. */
    @Structure.FieldOrder({"batch", "lr", "total_steps", "warmup", "schedule", "clip", "weight_decay", "seed",
            "max_tokens"})
    public static class BackpropOptions extends Structure {
        public int batch = 1;
        public float lr = 1e-3f;
        public int total_steps = 1;
        public int warmup;
        public int schedule;
        public float clip;
        public float weight_decay;
        public long seed;
        public int max_tokens = 128;
    }

    /** et_progress_callback. */
    public interface ProgressCallback extends Callback {
        int invoke(Pointer user, int step, int steps, float loss);
    }

    /** et_runtime_options. */
    @Structure.FieldOrder({"backend", "threads", "gpu_name"})
    public static class RuntimeOptions extends Structure {
        public int backend;
        public int threads;
        public String gpu_name;
    }

    /** et_generate_options. */
    @Structure.FieldOrder({"max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "chat"})
    public static class GenerateOptions extends Structure {
        public int max_tokens;
        public float temperature;
        public int top_k;
        public float top_p = 1.0f;
        public float repetition_penalty = 1.0f;
        public long seed;
        public byte chat;
    }

    /** et_token_callback. */
    public interface TokenCallback extends Callback {
        int invoke(Pointer user, Pointer piece, long len, int token);
    }

    public static final int BACKEND_AUTO = 0;
    public static final int BACKEND_CPU = 1;
    public static final int BACKEND_HOST = 2;
    public static final int BACKEND_GPU = 3;

    /** A result code other than ET_OK, with the library's text for it. */
    public static final class EdgetuneException extends RuntimeException {
        private static final long serialVersionUID = 1L;
        public final int code;

        EdgetuneException(int code, String message) {
            super("edgetune error " + code + ": " + message);
            this.code = code;
        }
    }

    static void check(int code) {
        if (code == 0) {
            return;
        }
        byte[] buf = new byte[2048];
        LongByReference n = new LongByReference();
        Lib.C.et_error_text(code, buf, buf.length, n);
        throw new EdgetuneException(code, new String(buf, 0, (int) n.getValue(), StandardCharsets.UTF_8));
    }

    /** The library's version (et_version). */
    public static String version() {
        return Lib.C.et_version();
    }

    /** A backend (et_runtime). */
    public static final class Runtime implements AutoCloseable {
        final PointerByReference handle = new PointerByReference();

        public Runtime(int backend, int threads) {
            RuntimeOptions o = new RuntimeOptions();
            o.backend = backend;
            o.threads = threads;
            check(Lib.C.et_runtime_new(o, handle));
        }

        @Override
        public void close() {
            Lib.C.et_runtime_free(handle);
        }
    }

    /** A model and its tokenizer (et_model). */
    public static final class Model implements AutoCloseable {
        final PointerByReference handle = new PointerByReference();

        public Model(Runtime rt, String path) {
            check(Lib.C.et_model_load_file(rt.handle.getValue(), path, handle));
        }

        Pointer h() {
            return handle.getValue();
        }

        public int vocabSize() {
            IntByReference n = new IntByReference();
            check(Lib.C.et_vocab_size(h(), n));
            return n.getValue();
        }

        public int[] tokenize(String text) {
            byte[] bytes = text.getBytes(StandardCharsets.UTF_8);
            LongByReference n = new LongByReference();
            check(Lib.C.et_tokenize(h(), bytes, bytes.length, null, 0, n));
            int[] ids = new int[(int) n.getValue()];
            check(Lib.C.et_tokenize(h(), bytes, bytes.length, ids, ids.length, n));
            return ids;
        }

        public String detokenize(int[] ids) {
            LongByReference n = new LongByReference();
            check(Lib.C.et_detokenize(h(), ids, ids.length, null, 0, n));
            byte[] buf = new byte[(int) n.getValue() + 1];
            check(Lib.C.et_detokenize(h(), ids, ids.length, buf, buf.length, n));
            return new String(buf, 0, (int) n.getValue(), StandardCharsets.UTF_8);
        }

        /** Greedy continuation of up to maxTokens, each whole piece of text passed to onPiece. */
        public int generate(String prompt, int maxTokens, Consumer<String> onPiece) {
            byte[] bytes = prompt.getBytes(StandardCharsets.UTF_8);
            GenerateOptions o = new GenerateOptions();
            o.max_tokens = maxTokens;
            TokenCallback cb = (user, piece, len, token) -> {
                onPiece.accept(new String(piece.getByteArray(0, (int) len), StandardCharsets.UTF_8));
                return 0;
            };
            LongByReference n = new LongByReference();
            check(Lib.C.et_generate(h(), bytes, bytes.length, o, cb, null, null, n));
            return (int) n.getValue();
        }

        /** Logits of every position: ids.length rows of vocabSize() values. */
        public float[] logits(int[] ids) {
            LongByReference n = new LongByReference();
            check(Lib.C.et_logits(h(), ids, ids.length, null, 0, n));
            float[] out = new float[(int) n.getValue()];
            check(Lib.C.et_logits(h(), ids, ids.length, out, out.length, n));
            return out;
        }

        /** Attaches LoRA of `rank`/`alpha` on q and v (refused while a Trainer or FedClient uses the model). */
        public void attachLora(int rank, float alpha, long seed) {
            LoraOptions o = new LoraOptions();
            o.rank = rank;
            o.alpha = alpha;
            o.seed = seed;
            check(Lib.C.et_adapter_lora(h(), o));
        }

        /** Trains the block scales of the quantised projections (ET_TARGET_* bits; 0 for all). */
        public void attachScales(int targets) {
            check(Lib.C.et_adapter_scales(h(), targets));
        }

        /** Trains the norm weights. */
        public void attachNorms() {
            check(Lib.C.et_adapter_norms(h()));
        }

        public void saveAdapter(String dir) {
            check(Lib.C.et_adapter_save(h(), dir));
        }

        public void loadAdapter(String dir) {
            check(Lib.C.et_adapter_load(h(), dir));
        }

        @Override
        public void close() {
            Lib.C.et_model_free(handle);
        }
    }

    /**
     * Examples for et_example[]: token ids, each predicting every token after its first. The
     * native memory lives as long as this object.
     */
    public static final class Examples {
        final Example[] array;
        private final Memory[] keep;

        public Examples(int[][] sequences) {
            array = (Example[]) new Example().toArray(sequences.length);
            keep = new Memory[2 * sequences.length];
            for (int i = 0; i < sequences.length; i++) {
                int n = sequences[i].length;
                if (n < 2) {
                    throw new IllegalArgumentException("example " + i + " has " + n + " tokens; a loss needs 2");
                }
                Memory tokens = new Memory(4L * n);
                tokens.write(0, sequences[i], 0, n);
                Memory flags = new Memory(n);
                for (int j = 0; j < n; j++) {
                    flags.setByte(j, (byte) (j == 0 ? 0 : 1));
                }
                keep[2 * i] = tokens;
                keep[2 * i + 1] = flags;
                array[i].tokens = tokens;
                array[i].targets = flags;
                array[i].len = n;
                array[i].write();
            }
        }

        void fence() {
            java.lang.ref.Reference.reachabilityFence(keep);
        }
    }

    /** A training session on a model's attached adapter (et_trainer), state kept between calls. */
    public static final class Trainer implements AutoCloseable {
        final PointerByReference handle = new PointerByReference();

        private Trainer() {}

        public static Trainer zerothOrder(Model model, ZoOptions o) {
            Trainer t = new Trainer();
            check(Lib.C.et_trainer_zo_new(model.h(), o, t.handle));
            return t;
        }

        public static Trainer backprop(Model model, BackpropOptions o) {
            Trainer t = new Trainer();
            check(Lib.C.et_trainer_backprop_new(model.h(), o, t.handle));
            return t;
        }

        /** Runs `steps` steps; onStep gets (step, loss). Returns the steps' mean loss. */
        public float train(Examples ex, int steps, java.util.function.BiConsumer<Integer, Float> onStep) {
            ProgressCallback cb = (user, step, total, loss) -> {
                onStep.accept(step, loss);
                return 0;
            };
            FloatByReference loss = new FloatByReference();
            check(Lib.C.et_trainer_train(handle.getValue(), ex.array, ex.array.length, steps, cb, null, null,
                    loss));
            ex.fence();
            return loss.getValue();
        }

        public float eval(Examples ex) {
            FloatByReference loss = new FloatByReference();
            check(Lib.C.et_trainer_eval(handle.getValue(), ex.array, ex.array.length, loss));
            ex.fence();
            return loss.getValue();
        }

        public void save(String dir) {
            check(Lib.C.et_trainer_save(handle.getValue(), dir));
        }

        public void resume(String dir) {
            check(Lib.C.et_trainer_resume(handle.getValue(), dir));
        }

        /** The zeroth-order state hash (32 bytes). */
        public byte[] stateHash() {
            byte[] out = new byte[32];
            check(Lib.C.et_trainer_state_hash(handle.getValue(), out));
            return out;
        }

        @Override
        public void close() {
            Lib.C.et_trainer_free(handle);
        }
    }

    /**
     * A federated client (et_fed_client): message processing only; the app's HTTP stack
     * carries the bytes (docs/protocol.md).
     */
    public static final class FedClient implements AutoCloseable {
        final PointerByReference handle = new PointerByReference();

        public FedClient(Model model, byte[] session, int clientId, String dir, int maxTokens) {
            check(Lib.C.et_fed_client_new(model.h(), session, session.length, clientId, dir, maxTokens, handle));
        }

        /** The next round's upload, after its local steps on `ex`. */
        public byte[] trainRound(Examples ex, int batch) {
            PointerByReference up = new PointerByReference();
            LongByReference len = new LongByReference();
            check(Lib.C.et_fed_client_train_round(handle.getValue(), ex.array, ex.array.length, batch, up, len,
                    null, null));
            ex.fence();
            byte[] bytes = up.getValue().getByteArray(0, (int) len.getValue());
            Lib.C.et_bytes_free(up.getValue(), len.getValue());
            return bytes;
        }

        public void markUploaded(int round) {
            check(Lib.C.et_fed_client_mark_uploaded(handle.getValue(), round));
        }

        /** Applies a round message; true if applied now, false if it was applied before. */
        public boolean applyRound(byte[] msg) {
            IntByReference round = new IntByReference();
            ByteByReference applied = new ByteByReference();
            check(Lib.C.et_fed_client_apply_round(handle.getValue(), msg, msg.length, round, applied));
            return applied.getValue() != 0;
        }

        public void restoreCheckpoint(byte[] cp) {
            check(Lib.C.et_fed_client_restore_checkpoint(handle.getValue(), cp, cp.length));
        }

        /** {last round applied, last round uploaded}. */
        public int[] rounds() {
            IntByReference a = new IntByReference();
            IntByReference u = new IntByReference();
            check(Lib.C.et_fed_client_rounds(handle.getValue(), a, u));
            return new int[] {a.getValue(), u.getValue()};
        }

        public byte[] stateHash() {
            byte[] out = new byte[32];
            check(Lib.C.et_fed_client_state_hash(handle.getValue(), out));
            return out;
        }

        @Override
        public void close() {
            Lib.C.et_fed_client_free(handle);
        }
    }

    /** The x-edgetune-signature of an upload body under the client's key (et_fed_sign). */
    public static String sign(byte[] key, long nonce, byte[] body) {
        byte[] out = new byte[65];
        check(Lib.C.et_fed_sign(key, key.length, nonce, body, body.length, out));
        return new String(out, 0, 64, StandardCharsets.US_ASCII);
    }
}
