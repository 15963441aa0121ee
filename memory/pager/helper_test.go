package pager

import (
	"fmt"
	"os"
	"sync"
	"testing"
)

// TestMain doubles as a pager process for TestPagerKilled: with
// ONEBOX_TEST_PAGER=SOCK set, the test binary serves SOCK and stalls
// after a few faults, until it is killed.
func TestMain(m *testing.M) {
	if sock := os.Getenv("ONEBOX_TEST_PAGER"); sock != "" {
		os.Exit(helperPager(sock))
	}
	os.Exit(m.Run())
}

// stallStore answers the first n Gets, then blocks every later one.
type stallStore struct {
	mu   sync.Mutex
	n    int
	once sync.Once
}

func (s *stallStore) Get(RegionID, uint64) ([]byte, bool) {
	s.mu.Lock()
	s.n--
	left := s.n
	s.mu.Unlock()
	if left >= 0 {
		return nil, false
	}
	s.once.Do(func() { fmt.Println("stalled") })
	select {} // a fault in flight when the pager dies
}

func helperPager(sock string) int {
	l, err := Listen(sock)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	p, err := New(&stallStore{n: 100}, nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("listening")
	p.Serve(l)
	return 0
}
