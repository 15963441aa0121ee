package fusefs

import (
	"context"
	"net"
	"syscall"
	"testing"

	"github.com/onebox-project/onebox/cfs/client"
	"github.com/onebox-project/onebox/cfs/proto"
)

// fakePeer answers every request with reply(op).
func fakePeer(t *testing.T, reply func(op proto.Op) proto.Msg) *client.Client {
	c := client.New(func(context.Context) (net.Conn, error) {
		a, b := net.Pipe()
		go func() {
			defer b.Close()
			for {
				f, err := proto.ReadFrame(b)
				if err != nil {
					return
				}
				if _, err := b.Write(proto.AppendReplyFrame(nil, f.ID, f.Op, 0, reply(f.Op))); err != nil {
					return
				}
			}
		}()
		return a, nil
	}, 0)
	t.Cleanup(func() { c.Close() })
	return c
}

// An owning node that answers more than was asked (a bug, or another
// version) is an I/O error, not a count the kernel was never given or
// bytes it did not ask for.
func TestFileHandleOverlongAnswers(t *testing.T) {
	ctx := context.Background()
	f := &fileHandle{c: fakePeer(t, func(op proto.Op) proto.Msg {
		if op == proto.OpWrite {
			return &proto.Count{N: 1 << 20}
		}
		return &proto.Data{Data: make([]byte, 4096)}
	}), h: 1}
	if n, errno := f.Write(ctx, make([]byte, 100), 0); errno != syscall.EIO {
		t.Errorf("write of 100 bytes answered 1 MiB written: got (%d, %v), want EIO", n, errno)
	}
	if _, errno := f.Read(ctx, make([]byte, 100), 0); errno != syscall.EIO {
		t.Errorf("read of 100 bytes answered 4096: got %v, want EIO", errno)
	}
}
