package dev.edgetune;

import com.sun.jna.Callback;
import com.sun.jna.Library;
import com.sun.jna.Memory;
import com.sun.jna.Native;
import com.sun.jna.Pointer;
import com.sun.jna.Structure;
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

        int et_adapter_save(Pointer model, String dir);

        int et_adapter_load(Pointer model, String dir);

        int et_train_backprop(Pointer model, Example[] examples, long n, TrainOptions opts,
                ProgressCallback callback, Pointer user, Pointer cancel, FloatByReference outLoss);
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

    /** et_train_options. */
    @Structure.FieldOrder({"steps", "batch", "lr", "warmup", "schedule", "clip", "weight_decay", "seed"})
    public static class TrainOptions extends Structure {
        public int steps;
        public int batch;
        public float lr;
        public int warmup;
        public int schedule;
        public float clip;
        public float weight_decay;
        public long seed;
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

        /** Attaches LoRA of `rank`/`alpha` on q and v. */
        public void attachLora(int rank, float alpha, long seed) {
            LoraOptions o = new LoraOptions();
            o.rank = rank;
            o.alpha = alpha;
            o.seed = seed;
            check(Lib.C.et_adapter_lora(h(), o));
        }

        public void saveAdapter(String dir) {
            check(Lib.C.et_adapter_save(h(), dir));
        }

        public void loadAdapter(String dir) {
            check(Lib.C.et_adapter_load(h(), dir));
        }

        /**
         * Trains the attached adapter by backprop (AdamW, constant rate, clip 1) on sequences of
         * token ids, each predicting every token after its first; onStep gets (step, loss).
         * Returns the last step's loss.
         */
        public float trainBackprop(int[][] sequences, int steps, int batch, float lr,
                java.util.function.BiConsumer<Integer, Float> onStep) {
            Example[] ex = (Example[]) new Example().toArray(sequences.length);
            Memory[] keep = new Memory[2 * sequences.length];
            for (int i = 0; i < sequences.length; i++) {
                int n = sequences[i].length;
                Memory tokens = new Memory(4L * n);
                tokens.write(0, sequences[i], 0, n);
                Memory flags = new Memory(n);
                for (int j = 0; j < n; j++) {
                    flags.setByte(j, (byte) (j == 0 ? 0 : 1));
                }
                keep[2 * i] = tokens;
                keep[2 * i + 1] = flags;
                ex[i].tokens = tokens;
                ex[i].targets = flags;
                ex[i].len = n;
            }
            TrainOptions o = new TrainOptions();
            o.steps = steps;
            o.batch = batch;
            o.lr = lr;
            o.clip = 1.0f;
            ProgressCallback cb = (user, step, total, loss) -> {
                onStep.accept(step, loss);
                return 0;
            };
            FloatByReference loss = new FloatByReference();
            check(Lib.C.et_train_backprop(h(), ex, ex.length, o, cb, null, null, loss));
            // The examples' memory must outlive the call.
            java.lang.ref.Reference.reachabilityFence(keep);
            return loss.getValue();
        }

        @Override
        public void close() {
            Lib.C.et_model_free(handle);
        }
    }
}
