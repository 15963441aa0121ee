package poolbench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/onebox-project/onebox/memory/cluster"
	"github.com/onebox-project/onebox/memory/cluster/clustertest"
	"github.com/onebox-project/onebox/memory/pool"
)

// cutTimeout is the request timeout of the pools that see a holder cut:
// what a load that is not hedged waits for the cut holder.
const cutTimeout = time.Second

// cutLatency measures page loads while a holder is cut off (alive to
// membership, answering nothing: a partition, or its agent stopped), in
// episodes: a fresh pool stores one page in each of 16 chunks on 3
// nodes, reads them once, then the node holding the most is cut and the
// 16 pages are loaded at once, 4 times over. It returns every load's
// latency and how many took the request timeout or more.
func cutLatency(ctx context.Context, c *clustertest.Cluster, episodes int) ([]time.Duration, int, error) {
	var all []time.Duration
	slow := 0
	for e := range episodes {
		p, err := c.NewPool(cluster.Options{Timeout: cutTimeout, RepairInterval: time.Hour})
		if err != nil {
			return nil, 0, err
		}
		r := pool.Region{Owner: fmt.Sprintf("bench/cut%d", e), ID: 1}
		const chunks = 16
		page := make([]byte, pool.PageSize)
		for i := range chunks {
			page[0] = byte(i)
			if err := p.Store(ctx, r, uint64(i)*cluster.ChunkSize, page); err != nil {
				p.Close()
				return nil, 0, err
			}
		}
		for i := range chunks {
			if err := p.Load(ctx, r, uint64(i)*cluster.ChunkSize, page); err != nil {
				p.Close()
				return nil, 0, err
			}
		}
		victim, most := "", uint64(0)
		for n, b := range p.Stats().NodeBytes {
			if b > most {
				victim, most = n, b
			}
		}
		c.Cut(victim)
		var mu sync.Mutex
		var errs []error
		for range 4 {
			var wg sync.WaitGroup
			for i := range chunks {
				wg.Add(1)
				go func() {
					defer wg.Done()
					buf := make([]byte, pool.PageSize)
					t := time.Now()
					err := p.Load(ctx, r, uint64(i)*cluster.ChunkSize, buf)
					d := time.Since(t)
					mu.Lock()
					defer mu.Unlock()
					if err == nil && buf[0] != byte(i) {
						err = fmt.Errorf("poolbench: chunk %d read back wrong", i)
					}
					if err != nil {
						errs = append(errs, err)
					}
					all = append(all, d)
					if d >= cutTimeout {
						slow++
					}
				}()
			}
			wg.Wait()
		}
		c.Heal(victim)
		p.DropOwner(ctx, r.Owner)
		p.Close()
		if len(errs) > 0 {
			return nil, 0, fmt.Errorf("poolbench: loads with %s cut: %w", victim, errs[0])
		}
	}
	return all, slow, nil
}
