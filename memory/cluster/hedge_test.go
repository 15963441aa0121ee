package cluster

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net"
	"slices"
	"testing"
	"testing/synctest"
	"time"

	"github.com/onebox-project/onebox/memory/pageproto"
)

func TestHedgeDelay(t *testing.T) {
	for _, tc := range []struct {
		p99, timeout, want time.Duration
	}{
		{0, 3 * time.Second, hedgeFloor},                     // nothing seen yet
		{30 * time.Microsecond, 3 * time.Second, hedgeFloor}, // a fast network: the floor
		{4 * time.Millisecond, 3 * time.Second, 16 * time.Millisecond},
		{time.Second, 3 * time.Second, hedgeCeiling},                 // a slow one: the ceiling
		{time.Second, 400 * time.Millisecond, 50 * time.Millisecond}, // never beyond an eighth of the timeout
		{0, 16 * time.Millisecond, 2 * time.Millisecond},             // nor the floor
	} {
		if got := hedgeDelay(tc.p99, tc.timeout); got != tc.want {
			t.Errorf("hedgeDelay(%v, %v) = %v, want %v", tc.p99, tc.timeout, got, tc.want)
		}
	}
}

func TestLatenciesP99(t *testing.T) {
	var l latencies
	if got := l.get(3 * time.Second); got != hedgeFloor {
		t.Fatalf("before any sample: %v", got)
	}
	// 99 fast loads in 100 and one slow one: the p99 is a fast one.
	for i := range 10 * latencySamples {
		d := 2 * time.Millisecond
		if i%100 == 99 {
			d = time.Second
		}
		l.add(d, 3*time.Second)
	}
	if got := l.get(3 * time.Second); got != 8*time.Millisecond {
		t.Fatalf("delay %v, want 4 x 2ms", got)
	}
	// Every load slow now: the delay follows, up to the ceiling.
	for range latencySamples {
		l.add(time.Second, 3*time.Second)
	}
	if got := l.get(3 * time.Second); got != hedgeCeiling {
		t.Fatalf("delay %v, want the ceiling", got)
	}
}

// pipeConn is a client conn over net.Pipe, its server end driven by the
// test (no hello).
func pipeConn(timeout time.Duration) (*conn, net.Conn) {
	c, s := net.Pipe()
	return &conn{node: "n", c: c, timeout: timeout, readTok: make(chan struct{}, 1),
		br: bufio.NewReader(c), pending: map[uint64]*call{}}, s
}

func answer(t *testing.T, s net.Conn, h pageproto.Header, payload []byte) {
	t.Helper()
	h.Op |= pageproto.RespBit
	h.Arg = uint64(pageproto.StatusOK)
	if _, err := s.Write(pageproto.AppendFrame(nil, h, "", payload)); err != nil {
		t.Error(err)
	}
}

// The reader's hedge point, in fake time: waitUntil gives up at until
// without consuming a byte or breaking the connection, the answer is
// taken later, and a silent server breaks the connection only at the
// timeout counted from the request.
func TestWaitUntilHedgePoint(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const timeout = time.Second
		cn, s := pipeConn(timeout)
		defer s.Close()
		reqs := make(chan pageproto.Header, 4)
		go func() {
			for {
				h, _, err := pageproto.ReadFrame(s, nil)
				if err != nil {
					return
				}
				reqs <- h
			}
		}()
		dst := make([]byte, pageproto.PageSize)
		t0 := time.Now()
		cl := cn.start(pageproto.Header{Op: pageproto.OpLoad, Offset: 0, Arg: pageproto.PageSize}, "o", nil, dst)
		h := <-reqs
		if cn.waitUntil(cl, nil, t0.Add(7*time.Millisecond)) {
			t.Fatal("done without an answer")
		}
		if d := time.Since(t0); d != 7*time.Millisecond {
			t.Fatalf("gave up after %v, want the 7ms asked", d)
		}
		if err := cn.broken(); err != nil {
			t.Fatalf("connection broken by the hedge point: %v", err)
		}
		// A stop channel cuts the wait short the same way.
		stop := make(chan struct{})
		time.AfterFunc(3*time.Millisecond, func() { close(stop) })
		if cn.waitUntil(cl, stop, time.Time{}) {
			t.Fatal("done without an answer")
		}
		if d := time.Since(t0); d < 10*time.Millisecond || d > 10*time.Millisecond+pollSlice {
			t.Fatalf("stopped after %v, want 10ms (+ at most %v)", d, pollSlice)
		}
		// Half an answer, then silence: the reader gives up in the middle
		// of the frame and the next one goes on from there.
		page := bytes.Repeat([]byte{7}, pageproto.PageSize)
		h.Op |= pageproto.RespBit
		h.Arg = uint64(pageproto.StatusOK)
		frame := pageproto.AppendFrame(nil, h, "", page)
		go s.Write(frame[:pageproto.HeaderSize+100])
		if cn.waitUntil(cl, nil, time.Now().Add(5*time.Millisecond)) {
			t.Fatal("done with half an answer")
		}
		go s.Write(frame[pageproto.HeaderSize+100:])
		if !cn.waitUntil(cl, nil, time.Time{}) {
			t.Fatal("answer not taken")
		}
		if _, _, err := cn.result(cl); err != nil || !bytes.Equal(dst, page) {
			t.Fatalf("result %v, equal %v", err, bytes.Equal(dst, page))
		}
		// An abandoned call's answer is read and dropped, not written
		// to its buffer.
		dst2 := make([]byte, pageproto.PageSize)
		cl2 := cn.start(pageproto.Header{Op: pageproto.OpLoad, Arg: pageproto.PageSize}, "o", nil, dst2)
		h2 := <-reqs
		if !cn.abandon(cl2) {
			t.Fatal("a pending call could not be abandoned")
		}
		go answer(t, s, h2, page)
		// A silent server: the connection breaks one timeout after the
		// request, not before.
		t1 := time.Now()
		cl3 := cn.start(pageproto.Header{Op: pageproto.OpStat}, "", nil, nil)
		<-reqs
		if !cn.waitUntil(cl3, nil, time.Time{}) {
			t.Fatal("wait without until or stop returned undone")
		}
		if _, _, err := cn.result(cl3); !errors.Is(err, ErrConnClosed) {
			t.Fatalf("silent server: %v, want ErrConnClosed", err)
		}
		if d := time.Since(t1); d != timeout {
			t.Fatalf("broke after %v, want the timeout %v", d, timeout)
		}
		if !bytes.Equal(dst2, make([]byte, pageproto.PageSize)) {
			t.Fatal("an abandoned call's buffer was written")
		}
	})
}

func TestClearRuns(t *testing.T) {
	for _, tc := range []struct {
		mask uint64
		want [][2]int
	}{
		{0, [][2]int{{0, 64}}},
		{^uint64(0), nil},
		{1, [][2]int{{1, 64}}},
		{1 << 63, [][2]int{{0, 63}}},
		{0b1001, [][2]int{{1, 3}, {4, 64}}},
		{^uint64(0) &^ (0b110 << 10), [][2]int{{11, 13}}},
	} {
		if got := clearRuns(tc.mask); !slices.Equal(got, tc.want) {
			t.Errorf("clearRuns(%#x) = %v, want %v", tc.mask, got, tc.want)
		}
	}
}

// Hedges are a tenth of loads at most, after a burst.
func TestHedgeBudget(t *testing.T) {
	var b budget
	b.tokens.Store(hedgeBurst * hedgeRatio)
	n := 0
	for b.spend() {
		n++
	}
	if n != hedgeBurst {
		t.Fatalf("burst of %d hedges, want %d", n, hedgeBurst)
	}
	for range 1000 {
		b.earn()
		if b.spend() {
			n++
		}
	}
	if n != hedgeBurst+1000/hedgeRatio {
		t.Fatalf("%d hedges in 1000 loads after the burst, want %d", n-hedgeBurst, 1000/hedgeRatio)
	}
	for range 100 * hedgeBurst * hedgeRatio {
		b.earn()
	}
	if got := b.tokens.Load(); got > hedgeBurst*hedgeRatio {
		t.Fatalf("budget grew to %d tenths, beyond the burst", got)
	}
}

// FuzzConnRead feeds arbitrary bytes to the client's response reader as a
// server's answers to a load and a stat in flight: it must not panic, must
// finish both calls (answered or failed) once the stream ends, and never
// hand a load more or less than the bytes it asked for.
func FuzzConnRead(f *testing.F) {
	resp := func(id uint64, op pageproto.Op, st pageproto.Status, payload []byte) []byte {
		return pageproto.AppendFrame(nil, pageproto.Header{Op: op | pageproto.RespBit, ID: id, Arg: uint64(st)}, "", payload)
	}
	page := bytes.Repeat([]byte{9}, pageproto.PageSize)
	stat := pageproto.Stat{Instance: 1, Capacity: 2}.Append(nil)
	f.Add(append(resp(1, pageproto.OpLoad, pageproto.StatusOK, page), resp(2, pageproto.OpStat, pageproto.StatusOK, stat)...))
	f.Add(append(resp(2, pageproto.OpStat, pageproto.StatusOK, stat), resp(1, pageproto.OpLoad, pageproto.StatusFull, []byte("full"))...))
	f.Add(resp(1, pageproto.OpLoad, pageproto.StatusOK, page[:100]))                           // a short load answer
	f.Add(resp(1, pageproto.OpLoad, pageproto.StatusOK, page)[:pageproto.HeaderSize+7])        // truncated
	f.Add(resp(7, pageproto.OpStat, pageproto.StatusOK, stat))                                 // an unknown id
	f.Add(pageproto.AppendFrame(nil, pageproto.Header{Op: pageproto.OpLoad, ID: 1}, "o", nil)) // a request
	f.Add([]byte("not a frame at all, not at all"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cn, s := pipeConn(10 * time.Second)
		go io.Copy(io.Discard, s) // the requests
		dst := make([]byte, pageproto.PageSize)
		load := cn.start(pageproto.Header{Op: pageproto.OpLoad, Arg: pageproto.PageSize}, "o", nil, dst)
		st := cn.start(pageproto.Header{Op: pageproto.OpStat}, "", nil, nil)
		go func() {
			s.Write(data)
			s.Close()
		}()
		for _, cl := range []*call{load, st} {
			if !cn.waitUntil(cl, nil, time.Time{}) {
				t.Fatal("a call undone at the end of the stream")
			}
		}
		if _, _, err := cn.result(load); err == nil && len(dst) != pageproto.PageSize {
			t.Fatalf("load answered with %d bytes", len(dst))
		}
		cn.close(errors.New("done"))
	})
}
