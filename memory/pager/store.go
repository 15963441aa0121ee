package pager

import "sync"

// MemStore is a Store in this process's memory.
type MemStore struct {
	mu    sync.Mutex
	pages map[RegionID]map[uint64][]byte // guarded by mu
}

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore {
	return &MemStore{pages: make(map[RegionID]map[uint64][]byte)}
}

// Put stores a copy of page (PageSize bytes) at offset of region.
func (s *MemStore) Put(region RegionID, offset uint64, page []byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := s.pages[region]
	if m == nil {
		m = make(map[uint64][]byte)
		s.pages[region] = m
	}
	m[offset] = append([]byte(nil), page...)
}

// Get implements Store.
func (s *MemStore) Get(region RegionID, offset uint64) ([]byte, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.pages[region][offset]
	return b, ok
}

// Forget implements Forgetter.
func (s *MemStore) Forget(region RegionID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pages, region)
}
