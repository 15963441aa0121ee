package pool

import (
	"bytes"
	"context"
	"errors"
	"testing"
)

func TestLocal(t *testing.T) {
	ctx := context.Background()
	l := NewLocal(3 * PageSize)
	if err := l.Reserve(ctx, "a", 2*PageSize); err != nil {
		t.Fatal(err)
	}
	if err := l.Reserve(ctx, "b", 2*PageSize); !errors.Is(err, ErrFull) {
		t.Fatalf("over capacity: got %v, want ErrFull", err)
	}
	l.Release("a", PageSize)
	if err := l.Reserve(ctx, "b", 2*PageSize); err != nil {
		t.Fatalf("after release: %v", err)
	}
	r := Region{Owner: "a", ID: 1}
	data := bytes.Repeat([]byte{7}, 2*PageSize)
	if err := l.Store(ctx, r, PageSize, data); err != nil {
		t.Fatal(err)
	}
	got := bytes.Repeat([]byte{9}, 3*PageSize)
	if err := l.Load(ctx, r, 0, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[:PageSize], make([]byte, PageSize)) || !bytes.Equal(got[PageSize:], data) {
		t.Fatal("load: want a zero page then the stored pages")
	}
	if err := l.Drop(ctx, r, PageSize, PageSize); err != nil {
		t.Fatal(err)
	}
	if l.Stored() != 1 {
		t.Fatalf("stored %d pages after drop, want 1", l.Stored())
	}
	if err := l.Store(ctx, r, 1, data); err == nil {
		t.Fatal("unaligned store accepted")
	}
	if err := l.DropOwner(ctx, "a"); err != nil || l.Stored() != 0 {
		t.Fatalf("drop owner: %v, %d pages left", err, l.Stored())
	}
}
