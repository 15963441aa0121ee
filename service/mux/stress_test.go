package mux

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Several streams at once, each delivered to a socket read slowly and
// unevenly (the receive loop never waits then, so it mixes direct writes
// and queued data on every stream): every stream's bytes arrive whole and
// in order, each byte once, and a clean end is an EOF.
func TestDeliverToManyStreamsInOrder(t *testing.T) {
	cl, sv := sessions(t, Config{})
	const streams, size = 6, 3 << 20
	var wg sync.WaitGroup
	for k := range streams {
		c, err := cl.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1000+7919*k) // frames and writes out of step
			for sent := 0; sent < size; {
				n := min(len(buf), size-sent)
				for i := range n {
					buf[i] = byte((sent + i + k) % 251)
				}
				if _, err := c.Write(buf[:n]); err != nil {
					t.Errorf("stream %d write: %v", k, err)
					return
				}
				sent += n
			}
			c.CloseWrite()
		}()
	}
	errs := make(chan error, streams)
	for range streams {
		s := accept(t, sv)
		sinkW, sinkR := tcpPair(t)
		s.DeliverTo(sinkW)
		copied := make(chan int64, 1)
		go func() {
			n, _ := io.Copy(sinkW, s)
			sinkW.(*net.TCPConn).CloseWrite()
			copied <- n
		}()
		go func() {
			sinkR.SetDeadline(time.Now().Add(60 * time.Second))
			var first [1]byte
			if _, err := io.ReadFull(sinkR, first[:]); err != nil {
				errs <- err
				return
			}
			k := (int(first[0]) + 251) % 251 // the stream's offset
			got := 1
			buf := make([]byte, 3000+int(first[0])*13)
			for {
				n, err := sinkR.Read(buf)
				for i := range n {
					if buf[i] != byte((got+i+k)%251) {
						errs <- io.ErrUnexpectedEOF
						t.Errorf("stream %d: byte %d differs", k, got+i)
						return
					}
				}
				got += n
				if got%(64<<10) < n {
					time.Sleep(time.Millisecond) // uneven pace, not a verdict
				}
				if err == io.EOF {
					break
				}
				if err != nil {
					s.mu.Lock()
					t.Logf("stream %d after %d bytes: recvN %d recvWin %d consumed %d inFlight %v remoteFin %v err %v delivered %d", k, got, s.recvN, s.recvWin, s.consumed, s.inFlight, s.remoteFin, s.err, s.delivered)
					s.mu.Unlock()
					errs <- err
					return
				}
			}
			if got != size {
				t.Errorf("stream %d: %d bytes, want %d", k, got, size)
			}
			cp := <-copied
			t.Logf("stream %d: %d bytes delivered by the receive loop, %d copied", k, s.Delivered(), cp)
			if n := cp + s.Delivered(); n != size {
				t.Errorf("stream %d: copied plus delivered = %d, want %d", k, n, size)
			}
			errs <- nil
		}()
	}
	for range streams {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	wg.Wait()
}
