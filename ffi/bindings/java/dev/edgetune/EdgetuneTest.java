package dev.edgetune;

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;

/**
 * The Java binding against the real library (run by .ci/run): version, a CPU runtime, the
 * tiny model's logits, a LoRA training run by backprop saved and reloaded, a missing file as
 * an exception with ET_IO (6), and on SmolLM2 tokenize, detokenize and a streamed greedy
 * generation; then zeroth-order steps resumed to the same state hash, and a federated round
 * against a real edgetune-server over java.net.http. Usage: EdgetuneTest TINY_MODEL
 * SMOLLM2.gguf SERVER_URL CLIENT_KEY_HEX (scripts/ffi_java_test.sh starts the server).
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
                // Training sessions: LoRA by backprop (the loss falling), then zeroth-order
                // steps, whose state hash a resumed session reproduces.
                tiny.attachLora(4, 8.0f, 1);
                Edgetune.Examples ex = new Edgetune.Examples(new int[][] {{1, 5, 9, 13, 17, 21}, {1, 5, 9, 13}});
                Edgetune.BackpropOptions bo = new Edgetune.BackpropOptions();
                bo.batch = 2;
                bo.lr = 5e-2f;
                bo.total_steps = 6;
                bo.clip = 1.0f;
                bo.max_tokens = 8;
                float[] first = {Float.NaN};
                float[] last = {Float.NaN};
                int[] calls = {0};
                try (Edgetune.Trainer t = Edgetune.Trainer.backprop(tiny, bo)) {
                    t.train(ex, 6, (step, loss) -> {
                        if (step == 1) {
                            first[0] = loss;
                        }
                        last[0] = loss;
                        calls[0]++;
                    });
                }
                require(calls[0] == 6 && last[0] < first[0], "training " + first[0] + " -> " + last[0]);
                Edgetune.ZoOptions zo = new Edgetune.ZoOptions();
                zo.batch = 2;
                zo.lr = 1e-2f;
                zo.seeds = 64;
                zo.seed = 5;
                zo.max_tokens = 8;
                byte[] hash;
                try (Edgetune.Trainer t = Edgetune.Trainer.zerothOrder(tiny, zo)) {
                    t.train(ex, 8, (step, loss) -> {});
                    hash = t.stateHash();
                    t.save("target/java/zo-run");
                }
                try (Edgetune.Model other = new Edgetune.Model(rt, args[0])) {
                    other.attachLora(4, 8.0f, 1);
                    try (Edgetune.Trainer t = Edgetune.Trainer.zerothOrder(other, zo)) {
                        t.resume("target/java/zo-run");
                        require(java.util.Arrays.equals(hash, t.stateHash()), "resumed state hash");
                    }
                }
                String dir = "target/java/adapter";
                tiny.saveAdapter(dir);
                float[] trained = tiny.logits(new int[] {1, 5, 9});
                try (Edgetune.Model again = new Edgetune.Model(rt, args[0])) {
                    again.loadAdapter(dir);
                    require(java.util.Arrays.equals(trained, again.logits(new int[] {1, 5, 9})),
                            "reloaded adapter");
                }
            }
            // QZO: the quantised model's block scales, by zeroth-order steps.
            try (Edgetune.Model q = new Edgetune.Model(rt, args[0])) {
                q.attachScales(0);
                Edgetune.ZoOptions zo = new Edgetune.ZoOptions();
                zo.batch = 1;
                zo.lr = 5e-2f;
                zo.seeds = 64;
                zo.max_tokens = 8;
                Edgetune.Examples ex = new Edgetune.Examples(new int[][] {{1, 5, 9, 13, 17, 21}});
                try (Edgetune.Trainer t = Edgetune.Trainer.zerothOrder(q, zo)) {
                    float before = t.eval(ex);
                    t.train(ex, 10, (step, loss) -> {});
                    require(t.eval(ex) != before, "block scales trained");
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
        federatedRound(args[0], args[2], args[3]);
        System.out.println("java binding: ok");
    }

    static byte[] get(HttpClient http, String url) throws Exception {
        for (int i = 0; i < 100; i++) {
            HttpResponse<byte[]> r = http.send(HttpRequest.newBuilder(URI.create(url)).build(),
                    HttpResponse.BodyHandlers.ofByteArray());
            if (r.statusCode() == 200) {
                return r.body();
            }
            Thread.sleep(100);
        }
        throw new AssertionError("GET " + url + " did not succeed");
    }

    /** One round as an Android app would run it: the app's HTTP client carries the bytes. */
    static void federatedRound(String tinyPath, String base, String keyHex) {
        try {
            HttpClient http = HttpClient.newHttpClient();
            byte[] key = new byte[keyHex.length() / 2];
            for (int i = 0; i < key.length; i++) {
                key[i] = (byte) Integer.parseInt(keyHex.substring(2 * i, 2 * i + 2), 16);
            }
            byte[] session = get(http, base + "/v1/session");
            try (Edgetune.Runtime rt = new Edgetune.Runtime(Edgetune.BACKEND_CPU, 0);
                    Edgetune.Model model = new Edgetune.Model(rt, tinyPath)) {
                model.attachLora(2, 4.0f, 0);
                try (Edgetune.FedClient c = new Edgetune.FedClient(model, session, 1, "target/java/fed-client", 16)) {
                    byte[] start = c.stateHash();
                    int[][] seqs = new int[4][11];
                    for (int i = 0; i < 4; i++) {
                        seqs[i][0] = 1;
                        for (int k = 0; k < 10; k++) {
                            seqs[i][k + 1] = (i * 7 + 3 * k) % 60 + 2;
                        }
                    }
                    byte[] upload = c.trainRound(new Edgetune.Examples(seqs), 2);
                    HttpResponse<String> r = http.send(HttpRequest.newBuilder(URI.create(base + "/v1/upload"))
                            .header("x-edgetune-client", "1")
                            .header("x-edgetune-nonce", "1")
                            .header("x-edgetune-signature", Edgetune.sign(key, 1, upload))
                            .POST(HttpRequest.BodyPublishers.ofByteArray(upload))
                            .build(), HttpResponse.BodyHandlers.ofString());
                    require(r.statusCode() == 200, "upload: " + r.statusCode() + " " + r.body());
                    c.markUploaded(1);
                    byte[] round = get(http, base + "/v1/rounds/1");
                    require(c.applyRound(round), "round 1 applied");
                    require(!c.applyRound(round), "round 1 applied once");
                    require(!java.util.Arrays.equals(start, c.stateHash()), "the state moved");
                    int[] rounds = c.rounds();
                    require(rounds[0] == 1 && rounds[1] == 1, "rounds " + rounds[0] + "/" + rounds[1]);
                    StringBuilder hex = new StringBuilder();
                    for (byte b : c.stateHash()) {
                        hex.append(String.format("%02x", b));
                    }
                    System.out.println("java: federated round 1 applied, state-hash " + hex);
                }
            }
        } catch (Exception e) {
            throw new AssertionError("federated round", e);
        }
    }
}
