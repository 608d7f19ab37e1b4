# Cosine similarity of the first embedding (one vector per line, space-separated, as
# `onnxpipe embed` writes them) with each of the following ones.
#   onnxpipe embed -m minilm sentences.txt | awk -f scripts/cosine.awk
{ for (i = 1; i <= NF; i++) v[NR, i] = $i; n = NF }
END {
    for (r = 2; r <= NR; r++) {
        dot = 0; a = 0; b = 0
        for (i = 1; i <= n; i++) { dot += v[1, i] * v[r, i]; a += v[1, i] ^ 2; b += v[r, i] ^ 2 }
        printf "line 1 vs line %d: cosine similarity %.3f\n", r, dot / sqrt(a * b)
    }
}
