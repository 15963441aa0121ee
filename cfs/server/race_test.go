package server

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/proto"
)

// Closing a handle while a read on it is in flight must not free the
// descriptor number for another file before the read used it.
func TestFSCloseDuringRead(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "a"), []byte("AAAA"), 0o644)
	os.WriteFile(filepath.Join(dir, "b"), []byte("BBBB"), 0o644)
	s, err := New([]Export{{Name: "rw", Path: dir}}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	c := client.New(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go s.ServeConn(b)
		return a, nil
	}, 0)
	defer func() { c.Close(); s.Close() }()
	ctx := context.Background()
	var ha proto.HandleReply
	if _, e := c.Call(ctx, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "a"}, &ha); e != 0 {
		t.Fatal(e)
	}
	inIO, release := make(chan struct{}), make(chan struct{})
	testHookIO = func() { close(inIO); <-release }
	defer func() { testHookIO = nil }()
	read := make(chan []byte, 1)
	go func() {
		var d proto.Data
		c.Call(ctx, proto.OpRead, &proto.IOReq{Handle: ha.Handle, Size: 4}, &d)
		read <- d.Data
	}()
	<-inIO
	testHookIO = nil
	closed := make(chan struct{})
	go func() {
		c.Call(ctx, proto.OpClose, &proto.HandleReq{Handle: ha.Handle}, nil)
		close(closed)
	}()
	select {
	case <-closed: // without the fix: the descriptor is already free
	case <-time.After(200 * time.Millisecond): // the close waits for the read
	}
	var hb proto.HandleReply
	if _, e := c.Call(ctx, proto.OpOpen, &proto.OpenReq{Export: "rw", Path: "b"}, &hb); e != 0 {
		t.Fatal(e)
	}
	close(release)
	if got := <-read; bytes.Contains(got, []byte("B")) {
		t.Fatalf("a read of a's handle, closed meanwhile, returned %q: another file's bytes", got)
	}
	<-closed
}
