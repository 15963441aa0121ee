package agent

import (
	"bytes"
	"testing"
)

func TestMemoryConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		in, want int
		ok       bool
	}{
		{0, DefaultMemoryReplicas, true},
		{1, 1, true},
		{3, 3, true},
		{8, 8, true},
		{9, 9, false},
		{-1, -1, false},
	} {
		c := MemoryConfig{MemoryReplicas: tc.in}
		err := c.validate()
		if (err == nil) != tc.ok || c.MemoryReplicas != tc.want {
			t.Errorf("replicas %d: got %d, %v", tc.in, c.MemoryReplicas, err)
		}
	}
}

// The probe's pattern differs between pages and seeds, so a page read
// from the wrong offset or another probe is caught.
func TestProbePattern(t *testing.T) {
	a := make([]byte, 3*4096)
	b := make([]byte, 3*4096)
	probePattern(a, 1, 0)
	probePattern(b, 1, 0)
	if !bytes.Equal(a, b) {
		t.Fatal("not deterministic")
	}
	if bytes.Equal(a[:4096], a[4096:8192]) {
		t.Fatal("two pages alike")
	}
	probePattern(b, 2, 0)
	if bytes.Equal(a[:4096], b[:4096]) {
		t.Fatal("two seeds alike")
	}
	c := make([]byte, 4096)
	probePattern(c, 1, 4096)
	if !bytes.Equal(c, a[4096:8192]) {
		t.Fatal("a page's pattern depends on how it was batched")
	}
}
