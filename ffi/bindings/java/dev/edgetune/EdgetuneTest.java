package dev.edgetune;

/**
 * The Java binding against the real library (run by .ci/run): version, a CPU runtime, the
 * tiny model's logits, a LoRA training run by backprop saved and reloaded, a missing file as
 * an exception with ET_IO (6), and on SmolLM2 tokenize, detokenize and a streamed greedy
 * generation. Usage: EdgetuneTest TINY_MODEL SMOLLM2.gguf
 */
public final class EdgetuneTest {
    private EdgetuneTest() {}

    static void require(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
    }

    public static void main(String[] args) {
        require(Edgetune.version().equals("0.1.0"), "version " + Edgetune.version());
        try (Edgetune.Runtime rt = new Edgetune.Runtime(Edgetune.BACKEND_CPU, 0)) {
            try (Edgetune.Model tiny = new Edgetune.Model(rt, args[0])) {
                float[] logits = tiny.logits(new int[] {1, 2, 3});
                require(logits.length == 3 * tiny.vocabSize(), "logits " + logits.length);
                // A training step: LoRA by backprop, the loss falling, saved and reloaded.
                tiny.attachLora(4, 8.0f, 1);
                float[] first = {Float.NaN};
                int[] calls = {0};
                float last = tiny.trainBackprop(new int[][] {{1, 5, 9, 13, 17, 21}, {1, 5, 9, 13}}, 6, 2,
                        5e-2f, (step, loss) -> {
                            if (step == 1) {
                                first[0] = loss;
                            }
                            calls[0]++;
                        });
                require(calls[0] == 6 && last < first[0], "training " + first[0] + " -> " + last);
                String dir = "target/java/adapter";
                tiny.saveAdapter(dir);
                float[] trained = tiny.logits(new int[] {1, 5, 9});
                try (Edgetune.Model again = new Edgetune.Model(rt, args[0])) {
                    again.loadAdapter(dir);
                    require(java.util.Arrays.equals(trained, again.logits(new int[] {1, 5, 9})),
                            "reloaded adapter");
                }
            }
            try (Edgetune.Model missing = new Edgetune.Model(rt, "/nonexistent.gguf")) {
                require(missing == null, "a missing file loaded");
            } catch (Edgetune.EdgetuneException e) {
                require(e.code == 6 && e.getMessage().contains("nonexistent"), e.getMessage());
            }
        }
        try (Edgetune.Runtime rt = new Edgetune.Runtime(Edgetune.BACKEND_HOST, 2);
                Edgetune.Model smol = new Edgetune.Model(rt, args[1])) {
            String prompt = "The capital of France is";
            int[] ids = smol.tokenize(prompt);
            require(smol.detokenize(ids).contains(prompt), "round trip");
            StringBuilder text = new StringBuilder();
            int n = smol.generate(prompt, 4, text::append);
            require(n > 0 && text.length() > 0, "generated " + n);
            System.out.println("java: generated" + text);
        }
        System.out.println("java binding: ok");
    }
}
