package cluster

import (
	"testing"

	"github.com/onebox-project/onebox/memory/pool"
)

func TestPieces(t *testing.T) {
	const P = pool.PageSize
	for _, tc := range []struct {
		name  string
		off   uint64
		n     int
		idx   []uint64
		masks []uint64
	}{
		{"one page", 0, P, []uint64{0}, []uint64{1}},
		{"third page", 2 * P, P, []uint64{0}, []uint64{4}},
		{"last page of a chunk", ChunkSize - P, P, []uint64{0}, []uint64{1 << 63}},
		{"whole chunk", ChunkSize, ChunkSize, []uint64{1}, []uint64{^uint64(0)}},
		{"across two", ChunkSize - 2*P, 4 * P, []uint64{0, 1}, []uint64{3 << 62, 3}},
		{"2 MiB aligned", 0, 2 << 20, []uint64{0, 1, 2, 3, 4, 5, 6, 7}, []uint64{^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0), ^uint64(0)}},
	} {
		ps := pieces(tc.off, make([]byte, tc.n))
		if len(ps) != len(tc.idx) {
			t.Fatalf("%s: %d pieces, want %d", tc.name, len(ps), len(tc.idx))
		}
		total := 0
		for i, pc := range ps {
			if pc.idx != tc.idx[i] || pc.mask != tc.masks[i] {
				t.Errorf("%s: piece %d is chunk %d mask %#x, want %d %#x", tc.name, i, pc.idx, pc.mask, tc.idx[i], tc.masks[i])
			}
			total += len(pc.data)
		}
		if total != tc.n {
			t.Errorf("%s: pieces cover %d bytes of %d", tc.name, total, tc.n)
		}
	}
}

func TestRendezvousStable(t *testing.T) {
	r := pool.Region{Owner: "n1/7", ID: 3}
	a := rendezvous(r, 5, []string{"n2", "n3", "n4", "n5"})
	b := rendezvous(r, 5, []string{"n5", "n4", "n3", "n2"})
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("order depends on the input order: %v vs %v", a, b)
		}
	}
	// Removing a node keeps the others' relative order (what rendezvous
	// hashing is for).
	c := rendezvous(r, 5, []string{"n2", "n3", "n5"})
	j := 0
	for _, n := range a {
		if n == "n4" {
			continue
		}
		if c[j] != n {
			t.Fatalf("without n4: %v, from %v", c, a)
		}
		j++
	}
	// Chunks spread over nodes.
	first := map[string]int{}
	for idx := range uint64(400) {
		first[rendezvous(r, idx, []string{"n2", "n3", "n4", "n5"})[0]]++
	}
	for _, n := range []string{"n2", "n3", "n4", "n5"} {
		if first[n] < 50 {
			t.Fatalf("chunks by first node: %v", first)
		}
	}
}

func TestZeroAbsent(t *testing.T) {
	const P = pool.PageSize
	data := make([]byte, 4*P)
	for i := range data {
		data[i] = 1
	}
	pc := pieces(ChunkSize+2*P, data)[0] // pages 2..5 of chunk 1
	zeroAbsent(pc, 1<<2|1<<4)            // pages 2 and 4 stored
	for i, want := range []byte{1, 0, 1, 0} {
		if data[i*P] != want || data[i*P+P-1] != want {
			t.Fatalf("page %d: %d, want %d", i, data[i*P], want)
		}
	}
}
